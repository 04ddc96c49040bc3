//! Atomic output: write beside the destination, then rename, so a reader sees the old file or the whole new one.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A temporary name in the destination's directory (a rename across file systems would not be atomic).
pub fn temp_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// A file being written beside its destination. [`PendingFile::commit`] syncs it and renames it over the
/// destination; dropped uncommitted (an error, a panic, an early return), it is removed and the destination is as
/// it was.
#[derive(Debug)]
pub struct PendingFile {
    temp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl PendingFile {
    /// The pending file for `dest` and the file to write into it.
    pub fn create(dest: &Path) -> io::Result<(PendingFile, File)> {
        let temp = temp_path(dest);
        let file = File::create(&temp)?;
        Ok((PendingFile { temp, dest: dest.to_path_buf(), committed: false }, file))
    }

    /// Syncs `file` (the one [`PendingFile::create`] returned, fully written) and renames it into place.
    pub fn commit(mut self, file: File) -> io::Result<()> {
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.temp, &self.dest)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Writes `dest` atomically through `write`, which is handed a buffered file beside `dest`: when `write` succeeds
/// the file is flushed, synced and renamed over `dest`; when anything fails it is removed and `dest` is as it was.
pub fn write_with<T, E: From<io::Error>>(
    dest: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<T, E>,
) -> Result<T, E> {
    let (pending, file) = PendingFile::create(dest)?;
    let mut out = BufWriter::new(file);
    let value = write(&mut out)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    pending.commit(file)?;
    Ok(value)
}

/// Writes `bytes` to `dest` atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(dest, |out| out.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_destination_as_it_was_and_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("virtlab-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("out.bin");
        write_atomic(&dest, b"old").unwrap();
        let failed: io::Result<()> = write_with(&dest, |out| {
            out.write_all(b"half of the new")?;
            Err(io::Error::other("the writer gave up"))
        });
        assert_eq!(failed.unwrap_err().to_string(), "the writer gave up");
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert!(!temp_path(&dest).exists());
        write_atomic(&dest, b"new").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "only the destination is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
