//! The embedded provider: sandbox objects from a YAML file, followed as it changes. A file that
//! cannot be read or parsed keeps the last good table, is logged and counted.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::metrics::metrics;
use crate::objects::{self, Sandbox};
use crate::provider::resolve;
use crate::table::{Record, TableWriter};
use crate::upstream::UpstreamPolicy;
use crate::watch::FileWatch;

const POLL: Duration = Duration::from_millis(200);
const NAME_REFRESH: Duration = Duration::from_secs(30);
const LABEL: &str = "file";

pub struct FileProvider {
    pub path: PathBuf,
    pub writer: Arc<Mutex<TableWriter>>,
    pub policy: Arc<UpstreamPolicy>,
}

/// The file provider's source name in the table.
pub const SOURCE: &str = "file";

/// A parsed file: records ready for the table, or sandboxes with names to resolve first.
enum Parsed {
    Records(Vec<Record>),
    Named(Vec<Sandbox>),
}

impl FileProvider {
    async fn publish(&self, sandboxes: &[Sandbox]) {
        self.publish_records(&resolve::records(sandboxes, &self.policy).await);
    }

    fn publish_records(&self, records: &[Record]) {
        let size = records.len();
        if let Ok(mut writer) = self.writer.lock() {
            writer.replace_source(SOURCE, records);
            writer.publish();
        }
        let m = metrics();
        m.provider_loads.with_label_values(&[LABEL]).inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        m.last_sync.set(now as i64);
        tracing::info!(sandboxes = size, path = %self.path.display(), "route table loaded");
    }

    fn failed(&self, last_error: &mut Option<String>, error: String) {
        // Count and log each distinct failure once, not on every poll.
        if last_error.as_deref() != Some(error.as_str()) {
            metrics().provider_errors.with_label_values(&[LABEL]).inc();
            tracing::error!(path = %self.path.display(), error = %error, "sandbox file not loaded; keeping the previous table");
            *last_error = Some(error);
        }
    }
}

/// Parses on a short-lived thread of its own, off the runtime's threads (a million-sandbox file
/// takes seconds), and turns the sandboxes into table records there too: everything transient
/// is allocated and freed by that thread, apart from the table's long-lived entries.
///
/// Records handed back through the returned sender are freed by the parser thread before it
/// ends: memory freed by the thread that allocated it goes back to the system with the thread,
/// while memory freed elsewhere can stay cached by the allocator (about 200 bytes per sandbox
/// at a million).
async fn parse_off_thread(
    file: std::fs::File,
    len: u64,
    policy: Arc<UpstreamPolicy>,
) -> (
    Result<Parsed, String>,
    Option<std_mpsc::Sender<Vec<Record>>>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("sandbox-file-parse".into())
        .spawn(move || {
            let parsed = objects::parse_file(file, len)
                .map_err(|e| e.to_string())
                .map(|sandboxes| {
                    if resolve::has_names(&sandboxes) {
                        Parsed::Named(sandboxes)
                    } else {
                        Parsed::Records(resolve::records_without_names(sandboxes, &policy))
                    }
                });
            let (back, returned) = std_mpsc::channel::<Vec<Record>>();
            if tx.send((parsed, back)).is_ok() {
                drop(returned.recv());
            }
        });
    if let Err(e) = spawned {
        return (Err(format!("cannot start parser thread: {e}")), None);
    }
    match rx.await {
        Ok((parsed, back)) => (parsed, Some(back)),
        Err(_) => (Err("parser thread failed".into()), None),
    }
}

#[async_trait]
impl BackgroundService for FileProvider {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut watch = FileWatch::new(&self.path);
        let mut current: Vec<Sandbox> = Vec::new();
        let mut last_error: Option<String> = None;
        let mut resolved_at = Instant::now();
        let mut ticker = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => {}
            }
            match watch.open_if_changed().await {
                Ok(Some((file, len))) => {
                    match parse_off_thread(file, len, self.policy.clone()).await {
                        (Ok(parsed), back) => {
                            last_error = None;
                            // Sandboxes are kept only when names must be resolved again; otherwise
                            // the table holds all there is to know.
                            current = match parsed {
                                Parsed::Records(records) => {
                                    self.publish_records(&records);
                                    if let Some(back) = back {
                                        let _ = back.send(records);
                                    }
                                    Vec::new()
                                }
                                Parsed::Named(sandboxes) => {
                                    self.publish(&sandboxes).await;
                                    sandboxes
                                }
                            };
                            resolved_at = Instant::now();
                        }
                        (Err(e), _) => self.failed(&mut last_error, format!("parse error: {e}")),
                    }
                }
                Ok(None) => {
                    if resolve::has_names(&current) && resolved_at.elapsed() >= NAME_REFRESH {
                        self.publish(&current).await;
                        resolved_at = Instant::now();
                    }
                }
                Err(e) => {
                    watch.reset();
                    self.failed(&mut last_error, format!("cannot read: {e}"));
                }
            }
        }
    }
}
