//! The files source: a directory of Kubernetes YAML, read with [`npc_policy::files::load_dir`]
//! and watched (inotify, through `notify`) so that edits apply live.
use std::path::{Path, PathBuf};

use notify::Watcher as _;
use npc_policy::files::{self, Loaded};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub struct DirSource {
    dir: PathBuf,
    _watcher: notify::RecommendedWatcher,
}

impl DirSource {
    /// Watches `dir`; the receiver gets a message after every change of a file in it.
    pub fn watch(dir: &Path) -> notify::Result<(Self, UnboundedReceiver<()>)> {
        let (tx, rx) = unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            use notify::event::{EventKind, ModifyKind};
            // Our own reads of DIR show up as access (and atime) events: only changes count.
            let changed = event.is_ok_and(|e| {
                matches!(
                    e.kind,
                    EventKind::Create(_)
                        | EventKind::Remove(_)
                        | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
                )
            });
            if changed {
                let _ = tx.send(());
            }
        })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok((
            Self {
                dir: dir.to_path_buf(),
                _watcher: watcher,
            },
            rx,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory as it is now; unreadable or broken documents are in `errors`.
    pub fn snapshot(&self) -> std::io::Result<Loaded> {
        files::load_dir(&self.dir)
    }
}
