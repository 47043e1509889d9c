//! The embedded provider: sandbox objects from a YAML file, followed as it changes. A file that
//! cannot be read or parsed keeps the last good table, is logged and counted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::metrics::metrics;
use crate::objects::{self, Sandbox};
use crate::provider::resolve;
use crate::table::TableWriter;
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

impl FileProvider {
    async fn publish(&self, sandboxes: &[Sandbox]) {
        let records = resolve::records(sandboxes, &self.policy).await;
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

/// Parses on a short-lived thread of its own: the parser's transient memory (many times the
/// file size for large files) then goes back to the system with the thread instead of staying
/// cached in a worker thread's allocator heap.
async fn parse_off_thread(text: String) -> Result<Vec<Sandbox>, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("sandbox-file-parse".into())
        .spawn(move || {
            let result = objects::parse_documents(&text).map_err(|e| e.to_string());
            drop(text);
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start parser thread: {e}"));
    }
    let parsed = rx
        .await
        .unwrap_or_else(|_| Err("parser thread failed".into()))?;
    // Copy into this thread's heap so none of the parser's pages stay pinned by live data.
    Ok(parsed.to_vec())
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
            match watch.read_if_changed().await {
                Ok(Some(text)) => match parse_off_thread(text).await {
                    Ok(sandboxes) => {
                        last_error = None;
                        self.publish(&sandboxes).await;
                        // Kept only when names must be resolved again; otherwise the table
                        // holds all there is to know.
                        current = if resolve::has_names(&sandboxes) {
                            sandboxes
                        } else {
                            Vec::new()
                        };
                        resolved_at = Instant::now();
                    }
                    Err(e) => self.failed(&mut last_error, format!("parse error: {e}")),
                },
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
