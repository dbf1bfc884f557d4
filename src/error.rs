use std::path::PathBuf;

/// Errors name what was wrong: the file, the tensor, the shapes, the value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("{path}: cannot parse config: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("unsupported {what} in {path}: {value} ({hint})")]
    Unsupported {
        path: PathBuf,
        what: &'static str,
        value: String,
        hint: &'static str,
    },

    #[error("{file}: tensor `{name}` {problem}")]
    Tensor {
        file: PathBuf,
        name: String,
        problem: String,
    },

    #[error("invalid {what}: {message}")]
    Invalid { what: &'static str, message: String },

    #[error(
        "the {what} has {count} NaN or infinite values out of {total}: the model or the settings produced an invalid result, so nothing is written from it"
    )]
    NonFinite {
        what: String,
        count: usize,
        total: usize,
    },

    /// A toy training stage stopped because the stage running beside it failed; its checkpoints stay.
    #[error("{stage} stopped at step {step} because the stage beside it failed")]
    Stopped { stage: String, step: usize },

    /// The caller's [`crate::denoise::CancelToken`] was set; nothing was written.
    #[error("cancelled")]
    Cancelled,

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(what: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            message: message.into(),
        }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            message: message.into(),
        }
    }
}
