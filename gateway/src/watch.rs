//! Noticing that a file changed, by polling its metadata. Polling follows atomic renames and the
//! symlink swaps of mounted ConfigMaps and Secrets, where inotify watches go stale.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    device: u64,
}

#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    last: Option<Stamp>,
}

impl FileWatch {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            last: None,
        }
    }

    /// The file's stamp when it changed since the last successful read (always on the first call).
    async fn changed(&self) -> io::Result<Option<Stamp>> {
        let meta = tokio::fs::metadata(&self.path).await?;
        let stamp = Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
            device: meta.dev(),
        };
        Ok((self.last != Some(stamp)).then_some(stamp))
    }

    /// Reads the file if it changed since the last successful read (always on the first call).
    pub async fn read_if_changed(&mut self) -> io::Result<Option<String>> {
        let Some(stamp) = self.changed().await? else {
            return Ok(None);
        };
        let text = tokio::fs::read_to_string(&self.path).await?;
        self.last = Some(stamp);
        Ok(Some(text))
    }

    /// Opens the file if it changed since the last successful open, for a reader that streams
    /// it (a large file is never held whole); with its length.
    pub async fn open_if_changed(&mut self) -> io::Result<Option<(std::fs::File, u64)>> {
        let Some(stamp) = self.changed().await? else {
            return Ok(None);
        };
        let file = tokio::fs::File::open(&self.path).await?.into_std().await;
        self.last = Some(stamp);
        Ok(Some((file, stamp.len)))
    }

    /// Forgets the last read so the next poll reads again.
    pub fn reset(&mut self) {
        self.last = None;
    }
}
