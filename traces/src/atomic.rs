//! Atomic output: write beside the destination, then rename, so a reader sees the old file or the whole new one.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A temporary name in the destination's directory (a rename across file systems would not be atomic).
pub fn temp_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `dest` atomically through `write`, which is handed a buffered file beside `dest`: when `write` succeeds
/// the file is flushed, synced and renamed over `dest`; when anything fails it is removed and `dest` is as it was.
pub fn write_with<T, E: From<io::Error>>(
    dest: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<T, E>,
) -> Result<T, E> {
    let temp = temp_path(dest);
    let result = (|| {
        let mut out = BufWriter::new(File::create(&temp)?);
        let value = write(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&temp, dest)?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Writes `bytes` to `dest` atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(dest, |out| out.write_all(bytes))
}
