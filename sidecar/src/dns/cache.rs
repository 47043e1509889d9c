//! Answers kept for their TTL (at most five minutes, at most 10,000 of them). Every policy
//! change starts a new generation, and answers of older generations are never served.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;

const ENTRIES: usize = 10_000;
pub const MAX_TTL: u32 = 300;

/// Name, type, class, DNSSEC OK, checking disabled.
pub type Key = (String, u16, u16, bool, bool);

struct Entry {
    message: Message,
    stored: Instant,
    ttl: u32,
    generation: u64,
}

impl Entry {
    fn live(&self, now: Instant, generation: u64) -> bool {
        self.generation == generation
            && now.duration_since(self.stored) < Duration::from_secs(u64::from(self.ttl))
    }
}

#[derive(Default)]
pub struct Cache {
    map: Mutex<HashMap<Key, Entry>>,
}

impl Cache {
    /// The answer stored under `key` in this generation, its TTLs lowered by its age.
    pub fn get(&self, key: &Key, generation: u64) -> Option<Message> {
        let map = self.map.lock().ok()?;
        let entry = map.get(key)?;
        let now = Instant::now();
        if !entry.live(now, generation) {
            return None;
        }
        let mut message = entry.message.clone();
        let age = u32::try_from(now.duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        for record in message
            .answers
            .iter_mut()
            .chain(message.authorities.iter_mut())
            .chain(message.additionals.iter_mut())
        {
            record.ttl = record.ttl.saturating_sub(age);
        }
        Some(message)
    }

    pub fn store(&self, key: Key, message: Message, ttl: u32, generation: u64) {
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        if map.len() >= ENTRIES {
            let now = Instant::now();
            map.retain(|_, e| e.live(now, generation));
            // Still full of live answers: drop a tenth, so the scan above runs once per
            // thousand inserts rather than on every one.
            if map.len() >= ENTRIES * 9 / 10 {
                let evict: Vec<Key> = map.keys().take(ENTRIES / 10).cloned().collect();
                for key in evict {
                    map.remove(&key);
                }
            }
        }
        map.insert(
            key,
            Entry {
                message,
                stored: Instant::now(),
                ttl: ttl.min(MAX_TTL),
                generation,
            },
        );
    }
}
