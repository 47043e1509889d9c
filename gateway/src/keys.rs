//! Re-reading the signing-keys file when it changes. A file that fails to parse, cannot be
//! read, or holds no key after keys were loaded (emptied, or caught half-written) keeps the
//! previous keys.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::access::KeyRing;
use crate::metrics::metrics;
use crate::watch::FileWatch;

const POLL: Duration = Duration::from_millis(500);

pub struct KeysReloader {
    pub path: PathBuf,
    pub keys: Arc<ArcSwap<KeyRing>>,
}

#[async_trait]
impl BackgroundService for KeysReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut watch = FileWatch::new(&self.path);
        let mut ticker = tokio::time::interval(POLL);
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => {}
            }
            let result = match watch.read_if_changed().await {
                Ok(Some(text)) => {
                    KeyRing::parse(&text)
                        .map_err(|e| e.to_string())
                        .and_then(|ring| {
                            if ring.is_empty() && !self.keys.load().is_empty() {
                                Err("the file holds no key".to_owned())
                            } else {
                                Ok(ring)
                            }
                        })
                }
                Ok(None) => continue,
                Err(e) => {
                    watch.reset();
                    Err(e.to_string())
                }
            };
            match result {
                Ok(ring) => {
                    last_error = None;
                    if **self.keys.load() != ring {
                        tracing::info!(keys = ring.len(), "secure-access keys reloaded");
                        self.keys.store(Arc::new(ring));
                    }
                }
                Err(error) if last_error.as_deref() != Some(error.as_str()) => {
                    metrics().key_reload_errors.inc();
                    tracing::error!(path = %self.path.display(), %error, "secure-access keys not reloaded; keeping the previous keys");
                    last_error = Some(error);
                }
                Err(_) => {}
            }
        }
    }
}

/// Warns when the keys file can be read by every user: the keys sign every route. A file its
/// group may read is not warned about: a Kubernetes Secret volume with `fsGroup` set is mounted
/// that way (0440, the pod's group), which is how a non-root gateway reads it.
pub fn warn_if_exposed(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "the secure-access keys file is readable by other users; make it 0600, 0400 or 0440"
            );
        }
    }
}
