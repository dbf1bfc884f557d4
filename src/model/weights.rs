//! Where parameters come from: safetensors files (memory-mapped; f32 data read straight into place) or, for
//! checking an architecture without its weights, a name/shape catalogue. Both feed candle's `VarBuilder` through
//! one backend that resolves legacy tensor names, checks shapes and says which file and tensor were at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::{Error, Result};

/// Shape and storage type of one stored tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// The names, shapes and dtypes a component's weight files hold.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl Catalog {
    /// A manifest as in `shared/fixtures/real-models`: `{"name": [dims...]}`.
    pub fn from_manifest(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: BTreeMap<String, Vec<usize>> =
            serde_json::from_str(&text).map_err(|source| Error::Config {
                path: path.to_path_buf(),
                source,
            })?;
        let tensors = raw
            .into_iter()
            .map(|(name, shape)| {
                (
                    name,
                    TensorInfo {
                        shape,
                        dtype: "manifest".into(),
                    },
                )
            })
            .collect();
        Ok(Self { tensors })
    }

    fn from_mmap(st: &MmapedSafetensors) -> Self {
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                (
                    name,
                    TensorInfo {
                        shape: view.shape().to_vec(),
                        dtype: format!("{:?}", view.dtype()).to_lowercase(),
                    },
                )
            })
            .collect();
        Self { tensors }
    }

    /// Storage dtypes present, e.g. {"f16"}.
    pub fn dtypes(&self) -> BTreeSet<String> {
        self.tensors.values().map(|t| t.dtype.clone()).collect()
    }

    pub fn parameter_count(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }
}

/// Alternative spellings of a parameter name, tried in order after the name itself.
pub type NameAliases = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

pub fn no_aliases(_: &str) -> Vec<String> {
    Vec::new()
}

/// The 2022 checkpoints name the VAE's attention projections query/key/value/proj_attn.
pub fn legacy_vae_aliases(name: &str) -> Vec<String> {
    const PAIRS: [(&str, &str); 4] = [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    PAIRS
        .iter()
        .filter(|(modern, _)| name.contains(modern))
        .map(|(modern, legacy)| name.replace(modern, legacy))
        .collect()
}

/// transformers 5 may write a CLIPTextModel / CLIPVisionModel without the `text_model.` / `vision_model.` prefix.
pub fn clip_tower_aliases(name: &str) -> Vec<String> {
    ["text_model.", "vision_model."]
        .iter()
        .filter_map(|prefix| name.strip_prefix(prefix).map(str::to_string))
        .collect()
}

/// One problem found while matching an architecture against stored tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    Missing {
        name: String,
        expected: Vec<usize>,
    },
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    Unexpected {
        name: String,
        shape: Vec<usize>,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Missing { name, expected } => {
                write!(f, "missing tensor `{name}` (expected shape {expected:?})")
            }
            Mismatch::Shape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor `{name}` has shape {found:?}, expected {expected:?}"
            ),
            Mismatch::Unexpected { name, shape } => {
                write!(
                    f,
                    "unexpected tensor `{name}` {shape:?} (not used by the architecture)"
                )
            }
        }
    }
}

/// What an audit collected: every (name, shape) the architecture asked for.
#[derive(Default, Debug)]
struct AuditLog {
    requested: BTreeMap<String, Vec<usize>>,
}

enum Storage {
    Mapped {
        st: MmapedSafetensors,
        /// Reads f32 data without going through the mapping, where the platform allows it.
        direct: Option<DirectReader>,
    },
    /// No data: requests are only recorded and answered with zero-stride zeros.
    Audit(Arc<Mutex<AuditLog>>),
}

struct Backend {
    origin: PathBuf,
    catalog: Catalog,
    aliases: NameAliases,
    storage: Storage,
}

impl Backend {
    fn resolve(&self, name: &str) -> Option<String> {
        if self.catalog.tensors.contains_key(name) {
            return Some(name.to_string());
        }
        (self.aliases)(name)
            .into_iter()
            .find(|alias| self.catalog.tensors.contains_key(alias))
    }

    fn tensor_error(&self, name: &str, problem: String) -> candle_core::Error {
        candle_core::Error::Msg(
            Error::Tensor {
                file: self.origin.clone(),
                name: name.to_string(),
                problem,
            }
            .to_string(),
        )
    }

    fn non_finite_error(&self, name: &str, bad: usize) -> candle_core::Error {
        self.tensor_error(
            name,
            format!("holds {bad} NaN or infinite values: the weight file is corrupt"),
        )
    }
}

/// NaN or infinite values among a stored tensor's raw data (float dtypes; integers have none), counted on the
/// mapped bytes without a copy: an all-ones exponent is inf or NaN in every IEEE format.
pub fn count_non_finite_stored(view: &safetensors::tensor::TensorView) -> usize {
    use rayon::prelude::*;
    use safetensors::Dtype;
    let data = view.data();
    let (size, exponent_mask): (usize, u64) = match view.dtype() {
        Dtype::F64 => (8, 0x7FF0_0000_0000_0000),
        Dtype::F32 => (4, 0x7F80_0000),
        Dtype::F16 => (2, 0x7C00),
        Dtype::BF16 => (2, 0x7F80),
        _ => return 0,
    };
    let bad = |chunk: &[u8]| -> usize {
        chunk
            .chunks_exact(size)
            .filter(|b| {
                let mut raw = [0u8; 8];
                raw[..size].copy_from_slice(b);
                u64::from_le_bytes(raw) & exponent_mask == exponent_mask
            })
            .count()
    };
    data.par_chunks(size * 65536).map(bad).sum()
}

#[cfg(all(unix, target_endian = "little"))]
/// Fills `dst` with the little-endian f32 values stored at byte `offset` of `file`. std's `read_exact_at` wants
/// initialised bytes, which would cost a zeroing pass over 4 GB of fresh memory first.
fn read_exact_at(
    file: &std::fs::File,
    dst: &mut [std::mem::MaybeUninit<f32>],
    offset: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (mut done, total) = (0usize, std::mem::size_of_val(dst));
    let base = dst.as_mut_ptr().cast::<u8>();
    while done < total {
        // SAFETY: writes at most `total - done` bytes into `dst` past the `done` already filled; pread only
        // writes plain bytes, and every bit pattern is a valid f32.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                base.add(done).cast(),
                total - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    Ok(())
}

#[cfg(not(all(unix, target_endian = "little")))]
struct DirectReader;

#[cfg(not(all(unix, target_endian = "little")))]
impl DirectReader {
    fn open(_: &[PathBuf]) -> Result<Option<Self>> {
        Ok(None)
    }

    fn read_f32_checked(&self, _: &str, _: usize) -> std::io::Result<(Vec<f32>, usize)> {
        unreachable!("never constructed on this platform")
    }
}

#[cfg(all(unix, target_endian = "little"))]
/// Reads tensors with positioned reads straight into their final buffers instead of copying them out of the
/// mapping: the process never maps the file's pages (so its resident size is the weights, not weights plus file),
/// and the fresh buffers are asked for 2 MiB pages, which makes filling 4 GB of them several times faster.
struct DirectReader {
    files: Vec<std::fs::File>,
    /// Stored name -> (index into `files`, absolute byte offset of the data).
    places: std::collections::HashMap<String, (usize, u64)>,
}

#[cfg(all(unix, target_endian = "little"))]
impl DirectReader {
    /// Parses each file's header (already validated by the mapping) for the data offsets.
    fn open(paths: &[PathBuf]) -> Result<Option<Self>> {
        use std::io::Read;
        let mut files = Vec::new();
        let mut places = std::collections::HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let io = |source| Error::Io {
                path: path.clone(),
                source,
            };
            let mut file = std::fs::File::open(path).map_err(io)?;
            let mut len = [0u8; 8];
            file.read_exact(&mut len).map_err(io)?;
            let header_len = u64::from_le_bytes(len);
            let mut header = vec![0u8; header_len as usize];
            file.read_exact(&mut header).map_err(io)?;
            let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
                .map_err(|e| Error::file(path, format!("unreadable safetensors header: {e}")))?;
            for (name, info) in metadata.tensors() {
                let offset = 8 + header_len + info.data_offsets.0 as u64;
                places.insert(name, (index, offset));
            }
            files.push(file);
        }
        Ok(Some(Self { files, places }))
    }

    /// The f32 values of `name` (`count` of them) and how many are NaN or infinite.
    fn read_f32_checked(&self, name: &str, count: usize) -> std::io::Result<(Vec<f32>, usize)> {
        use rayon::prelude::*;
        let &(file, offset) = self.places.get(name).ok_or_else(|| {
            std::io::Error::other("not in the header read at open (was the file replaced?)")
        })?;
        let file = &self.files[file];
        let mut values = Vec::<f32>::with_capacity(count);
        crate::runtime::advise_huge_pages(values.spare_capacity_mut());
        const CHUNK: usize = 1 << 20;
        // Each task checks its chunk right after reading it, while the chunk is still in cache.
        let bad = values.spare_capacity_mut()[..count]
            .par_chunks_mut(CHUNK)
            .enumerate()
            .map(|(i, chunk)| -> std::io::Result<usize> {
                read_exact_at(file, chunk, offset + (i * CHUNK * 4) as u64)?;
                // SAFETY: read_exact_at returned Ok, so it wrote every element of the chunk.
                let read = unsafe {
                    std::slice::from_raw_parts(chunk.as_ptr().cast::<f32>(), chunk.len())
                };
                Ok(read.iter().filter(|v| !v.is_finite()).count())
            })
            .sum::<std::io::Result<usize>>()?;
        // SAFETY: every one of the `count` elements was written above.
        unsafe { values.set_len(count) };
        Ok((values, bad))
    }
}

/// Same element count and only trailing unit dims differ (LDM-converted 1x1 conv attention weights).
fn compatible_shape(found: &[usize], expected: &[usize]) -> bool {
    if found == expected {
        return true;
    }
    let strip = |s: &[usize]| -> Vec<usize> {
        let mut v = s.to_vec();
        while v.len() > 1 && v.last() == Some(&1) {
            v.pop();
        }
        v
    };
    strip(found) == strip(expected)
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match &self.storage {
            Storage::Audit(log) => {
                log.lock()
                    .expect("audit log poisoned")
                    .requested
                    .insert(name.to_string(), shape.dims().to_vec());
                Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
            }
            Storage::Mapped { st, direct } => {
                let stored = self.resolve(name).ok_or_else(|| {
                    let looked: Vec<String> = (self.aliases)(name)
                        .iter()
                        .map(|a| format!("`{a}`"))
                        .collect();
                    let also = if looked.is_empty() {
                        String::new()
                    } else {
                        format!(", stored as {}", looked.join(" or "))
                    };
                    self.tensor_error(
                        name,
                        format!("is missing (expected shape {:?}{also})", shape.dims()),
                    )
                })?;
                let found = &self.catalog.tensors[&stored].shape;
                if !compatible_shape(found, shape.dims()) {
                    return Err(self.tensor_error(
                        &stored,
                        format!("has shape {found:?}, expected {:?}", shape.dims()),
                    ));
                }
                let view = st.get(&stored)?;
                if let (Some(direct), safetensors::Dtype::F32) = (direct, view.dtype()) {
                    let (values, bad) = direct
                        .read_f32_checked(&stored, view.data().len() / 4)
                        .map_err(|e| {
                            self.tensor_error(&stored, format!("could not be read: {e}"))
                        })?;
                    if bad > 0 {
                        return Err(self.non_finite_error(&stored, bad));
                    }
                    return Tensor::from_vec(values, shape, &Device::Cpu)?
                        .to_device(dev)?
                        .to_dtype(dtype);
                }
                let bad = count_non_finite_stored(&view);
                if bad > 0 {
                    return Err(self.non_finite_error(&stored, bad));
                }
                st.load(&stored, dev)?.reshape(shape)?.to_dtype(dtype)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let stored = self
            .resolve(name)
            .ok_or_else(|| self.tensor_error(name, "is missing".to_string()))?;
        match &self.storage {
            Storage::Audit(log) => {
                let shape = self.catalog.tensors[&stored].shape.clone();
                log.lock()
                    .expect("audit log poisoned")
                    .requested
                    .insert(name.to_string(), shape.clone());
                Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
            }
            Storage::Mapped { st, .. } => {
                let bad = count_non_finite_stored(&st.get(&stored)?);
                if bad > 0 {
                    return Err(self.non_finite_error(&stored, bad));
                }
                st.load(&stored, dev)?.to_dtype(dtype)
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }
}

/// The weight files of one component folder (`unet/`, `vae/`, ...).
pub struct WeightFiles {
    pub folder: PathBuf,
    pub files: Vec<PathBuf>,
}

impl WeightFiles {
    /// One weight file holding every component (an original-layout single-file checkpoint).
    pub fn single(file: &Path) -> Result<Self> {
        if !file.is_file() {
            return Err(Error::file(file, "no such checkpoint file"));
        }
        Ok(Self {
            folder: file.parent().unwrap_or(Path::new(".")).to_path_buf(),
            files: vec![file.to_path_buf()],
        })
    }

    /// Finds the safetensors of a component: a sharded index, the plain file, or a dtype variant
    /// (`*.fp16.safetensors`) when it is the only one.
    pub fn find(folder: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(folder).map_err(|source| Error::Io {
            path: folder.to_path_buf(),
            source,
        })?;
        let mut all: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        all.sort();
        let name = |p: &PathBuf| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string()
        };
        if let Some(index) = all
            .iter()
            .find(|p| name(p).ends_with(".safetensors.index.json"))
        {
            return Self::from_index(folder, index);
        }
        let st: Vec<&PathBuf> = all
            .iter()
            .filter(|p| name(p).ends_with(".safetensors"))
            .collect();
        let plain: Vec<&PathBuf> = st
            .iter()
            .copied()
            .filter(|p| name(p).matches('.').count() == 1)
            .collect();
        let chosen = if !plain.is_empty() { plain } else { st };
        match chosen.as_slice() {
            [] => Err(Error::file(
                folder,
                "no .safetensors weight file in this folder (only safetensors are read; convert .bin/.ckpt first)",
            )),
            [one] => Ok(Self {
                folder: folder.to_path_buf(),
                files: vec![(*one).clone()],
            }),
            many => Err(Error::file(
                folder,
                format!(
                    "several weight files and no index to choose between them: {}",
                    many.iter().map(|p| name(p)).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    fn from_index(folder: &Path, index: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let parsed: Index = serde_json::from_str(&text).map_err(|source| Error::Config {
            path: index.to_path_buf(),
            source,
        })?;
        let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
        Ok(Self {
            folder: folder.to_path_buf(),
            files: shards.into_iter().map(|s| folder.join(s)).collect(),
        })
    }

    fn origin(&self) -> PathBuf {
        match self.files.as_slice() {
            [one] => one.clone(),
            _ => self.folder.clone(),
        }
    }

    fn mmap(&self) -> Result<MmapedSafetensors> {
        // SAFETY: the files are opened read-only; as with every mmap, they must not be truncated while in use.
        unsafe { MmapedSafetensors::multi(&self.files) }
            .map_err(|e| Error::file(self.origin(), e.to_string()))
    }

    /// A `VarBuilder` over the stored weights, converted to `dtype` on `device`.
    pub fn var_builder(
        &self,
        aliases: NameAliases,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        let st = self.mmap()?;
        let catalog = Catalog::from_mmap(&st);
        let backend = Backend {
            origin: self.origin(),
            catalog,
            aliases,
            storage: Storage::Mapped {
                st,
                direct: DirectReader::open(&self.files)?,
            },
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }

    /// Every stored tensor holding NaN or infinite values, with how many.
    pub fn non_finite(&self) -> Result<Vec<(String, usize)>> {
        let st = self.mmap()?;
        let mut found: Vec<(String, usize)> = st
            .tensors()
            .iter()
            .map(|(name, view)| (name.clone(), count_non_finite_stored(view)))
            .filter(|(_, bad)| *bad > 0)
            .collect();
        found.sort();
        Ok(found)
    }

    pub fn catalog(&self) -> Result<Catalog> {
        Ok(Catalog::from_mmap(&self.mmap()?))
    }
}

/// Builds an architecture against a catalogue without loading any data and reports every mismatch.
pub struct Audit {
    log: Arc<Mutex<AuditLog>>,
    catalog: Catalog,
    aliases: NameAliases,
    /// Name a missing tensor by its first alias (a single file's own spelling) rather than the requested name.
    stored_names: bool,
}

impl Audit {
    pub fn new(catalog: Catalog, aliases: NameAliases) -> Self {
        Self {
            log: Arc::new(Mutex::new(AuditLog::default())),
            catalog,
            aliases,
            stored_names: false,
        }
    }

    /// Reports missing tensors under the names the file would store them by.
    pub fn reporting_stored_names(mut self) -> Self {
        self.stored_names = true;
        self
    }

    /// A `VarBuilder` whose tensors are zero-stride zeros: building even SD-sized models costs no memory.
    pub fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        let backend = Backend {
            origin: PathBuf::from("<audit>"),
            catalog: self.catalog.clone(),
            aliases: self.aliases.clone(),
            storage: Storage::Audit(self.log.clone()),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, Device::Cpu)
    }

    /// Every tensor the architecture asked for, with its shape.
    pub fn requested(&self) -> BTreeMap<String, Vec<usize>> {
        self.log
            .lock()
            .expect("audit log poisoned")
            .requested
            .clone()
    }

    /// Compares what was requested with the catalogue; `ignorable` names stored tensors that may be left unused.
    pub fn mismatches(&self, ignorable: &dyn Fn(&str) -> bool) -> Vec<Mismatch> {
        let requested = self.requested();
        let mut problems = Vec::new();
        let mut used = BTreeSet::new();
        for (name, expected) in &requested {
            let stored = std::iter::once(name.clone())
                .chain((self.aliases)(name))
                .find(|n| self.catalog.tensors.contains_key(n));
            match stored {
                None => problems.push(Mismatch::Missing {
                    name: match self.stored_names {
                        true => (self.aliases)(name)
                            .first()
                            .cloned()
                            .unwrap_or(name.clone()),
                        false => name.clone(),
                    },
                    expected: expected.clone(),
                }),
                Some(stored) => {
                    let found = &self.catalog.tensors[&stored].shape;
                    if !compatible_shape(found, expected) {
                        problems.push(Mismatch::Shape {
                            name: stored.clone(),
                            expected: expected.clone(),
                            found: found.clone(),
                        });
                    }
                    used.insert(stored);
                }
            }
        }
        for (name, info) in &self.catalog.tensors {
            if !used.contains(name) && !ignorable(name) {
                problems.push(Mismatch::Unexpected {
                    name: name.clone(),
                    shape: info.shape.clone(),
                });
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(count: usize, seed: u32) -> Vec<f32> {
        (0..count)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    /// A file of two f32 tensors (one spanning several read chunks and an odd tail) and an f16 one.
    fn write_file(dir: &Path, big: &[f32]) -> PathBuf {
        let small = values(5, 7);
        let half: Vec<half::f16> = values(6, 9)
            .iter()
            .map(|&v| half::f16::from_f32(v))
            .collect();
        let tensors = [
            (
                "big",
                Tensor::from_slice(big, (3, big.len() / 3), &Device::Cpu).unwrap(),
            ),
            (
                "small",
                Tensor::from_slice(&small, 5, &Device::Cpu).unwrap(),
            ),
            (
                "half",
                Tensor::from_slice(&half, (2, 3), &Device::Cpu).unwrap(),
            ),
        ];
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors.into_iter().collect(), &path).unwrap();
        path
    }

    fn load(path: &Path, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        WeightFiles::single(path)
            .unwrap()
            .var_builder(Arc::new(no_aliases), DType::F32, &Device::Cpu)
            .unwrap()
            .get(shape, name)
    }

    #[test]
    fn tensors_read_directly_hold_the_stored_values() {
        let dir = tempfile::tempdir().unwrap();
        let big = values(3 * ((1 << 20) + 333), 3);
        let path = write_file(dir.path(), &big);
        let read = load(&path, "big", &[3, big.len() / 3]).unwrap();
        assert_eq!(read.flatten_all().unwrap().to_vec1::<f32>().unwrap(), big);
        let small = load(&path, "small", &[5]).unwrap();
        assert_eq!(small.to_vec1::<f32>().unwrap(), values(5, 7));
        let half = load(&path, "half", &[2, 3]).unwrap();
        let expected: Vec<f32> = values(6, 9)
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(
            half.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected
        );
    }

    #[test]
    fn non_finite_values_anywhere_in_a_tensor_are_refused_by_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut big = values(3 * ((1 << 20) + 333), 3);
        let last = big.len() - 1;
        big[(1 << 20) + 17] = f32::NAN;
        big[last] = f32::NEG_INFINITY;
        let path = write_file(dir.path(), &big);
        let err = load(&path, "big", &[3, big.len() / 3])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`big`") && err.contains("holds 2 NaN or infinite"),
            "{err}"
        );
        assert!(load(&path, "small", &[5]).is_ok());
    }
}
