//! What can go wrong reading a results directory or writing a report: each error names the file and says what
//! was expected there.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read it: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: cannot write it: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{}: {problem}; expected {expected}", path.display())]
    Invalid { path: PathBuf, problem: String, expected: String },
    #[error(
        "{}: written with results schema version {found}, newer than the {supported} this virtlab reads; \
         read it with the virtlab that wrote it (or a newer one)",
        path.display()
    )]
    NewerSchema { path: PathBuf, found: u64, supported: u64 },
    #[error("{}: the sweep has no results ({detail}); sweep at least one trace with one engine and profile", path.display())]
    Empty { path: PathBuf, detail: String },
    #[error("cannot draw chart {}: {message}", path.display())]
    Chart { path: PathBuf, message: String },
}

impl Error {
    /// A file could not be read or written, as opposed to one that was read and is not what it should be.
    pub fn is_io(&self) -> bool {
        matches!(self, Error::Read { .. } | Error::Write { .. })
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, problem: impl Into<String>, expected: impl Into<String>) -> Self {
        Error::Invalid { path: path.into(), problem: problem.into(), expected: expected.into() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
