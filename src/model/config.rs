//! Reading the config.json files of a diffusers / transformers folder into typed structs.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// A value given either once for every level or as one entry per level.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum PerLevel<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerLevel<T> {
    /// The value for each of `levels` levels, or `None` when a list has the wrong length.
    pub fn expand(&self, levels: usize) -> Option<Vec<T>> {
        match self {
            PerLevel::One(v) => Some(vec![v.clone(); levels]),
            PerLevel::Each(list) if list.len() == levels => Some(list.clone()),
            PerLevel::Each(_) => None,
        }
    }
}
