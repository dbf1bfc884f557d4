//! The pretrained networks of a Stable Diffusion v1.x/v2.x folder (diffusers layout) and the CLIP image encoder.

pub mod clip;
pub mod config;
mod fused;
mod fused_attention;
mod fused_conv;
pub mod hook;
pub mod nn;
pub mod scheduler;
mod simd;
pub mod single_file;
pub mod source;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
mod winograd;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::model::scheduler::{Ddim, SchedulerConfig};
use crate::{Error, Result};
use clip::text::{ClipTextConfig, ClipTextTransformer};
use clip::vision::{ClipVisionConfig, ClipVisionTransformer};
use tokenizer::ClipTokenizer;
use unet::{UNet2DConditionModel, UNetConfig};
use vae::{AutoencoderKL, VaeConfig};
use weights::{
    Audit, Catalog, Mismatch, NameAliases, WeightFiles, clip_tower_aliases, legacy_vae_aliases,
    no_aliases,
};

/// The weight-bearing components of a pipeline folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComponentKind {
    TextEncoder,
    Unet,
    Vae,
    ImageEncoder,
}

impl ComponentKind {
    pub const ALL: [ComponentKind; 4] =
        [Self::TextEncoder, Self::Unet, Self::Vae, Self::ImageEncoder];

    pub fn folder_name(self) -> &'static str {
        match self {
            Self::TextEncoder => "text_encoder",
            Self::Unet => "unet",
            Self::Vae => "vae",
            Self::ImageEncoder => "image_encoder",
        }
    }

    fn aliases(self) -> NameAliases {
        match self {
            Self::Vae => std::sync::Arc::new(legacy_vae_aliases),
            Self::TextEncoder | Self::ImageEncoder => std::sync::Arc::new(clip_tower_aliases),
            Self::Unet => std::sync::Arc::new(no_aliases),
        }
    }

    /// How this component's names are spelt in an original-layout single file (the mapping needs its config).
    fn single_file_aliases(self, config_path: &Path) -> Result<NameAliases> {
        Ok(match self {
            Self::Unet => single_file::aliases(self, Some(UNetConfig::load(config_path)?), None),
            Self::Vae => single_file::aliases(self, None, Some(VaeConfig::load(config_path)?)),
            _ => single_file::aliases(self, None, None),
        })
    }

    /// Checks a single-file checkpoint's tensors for this component (those under its prefix) against the
    /// architecture of `config_path`.
    pub fn audit_single_file(self, config_path: &Path, catalog: Catalog) -> Result<Vec<Mismatch>> {
        let audit =
            Audit::new(catalog, self.single_file_aliases(config_path)?).reporting_stored_names();
        self.build(config_path, audit.var_builder(DType::F32))?;
        let prefix = single_file::prefix(self).unwrap_or("");
        Ok(audit.mismatches(&|name| {
            !name.starts_with(prefix) || self.ignorable(name.trim_start_matches(prefix))
        }))
    }

    /// Stored tensors this component may leave unused: buffers of older transformers versions and, for an image
    /// encoder given as a full CLIPModel checkpoint, the text tower.
    pub fn ignorable(self, name: &str) -> bool {
        match self {
            Self::TextEncoder => name.ends_with("embeddings.position_ids"),
            Self::ImageEncoder => {
                name.ends_with("embeddings.position_ids")
                    || name.starts_with("text_model.")
                    || name == "text_projection.weight"
                    || name == "logit_scale"
            }
            Self::Unet | Self::Vae => false,
        }
    }

    /// Builds the architecture described by `config_path` against `audit`, which then lists every tensor it asked
    /// for.
    pub fn build_for_audit(self, config_path: &Path, audit: &Audit) -> Result<()> {
        self.build(config_path, audit.var_builder(DType::F32))
    }

    /// Builds the architecture described by `config_path` on `vb` (any backend) and drops it.
    fn build(self, config_path: &Path, vb: VarBuilder) -> Result<()> {
        match self {
            Self::TextEncoder => {
                ClipTextTransformer::load(&ClipTextConfig::load(config_path)?, vb)?;
            }
            Self::Unet => {
                UNet2DConditionModel::load(&UNetConfig::load(config_path)?, vb)?;
            }
            Self::Vae => {
                AutoencoderKL::load(&VaeConfig::load(config_path)?, vb)?;
            }
            Self::ImageEncoder => {
                ClipVisionTransformer::load(&ClipVisionConfig::load(config_path)?, vb)?;
            }
        }
        Ok(())
    }

    /// Checks, without loading data, that the tensors this architecture asks for are exactly those in `catalog`
    /// (names, through legacy spellings, and shapes).
    pub fn audit(self, config_path: &Path, catalog: Catalog) -> Result<Vec<Mismatch>> {
        let audit = Audit::new(catalog, self.aliases());
        self.build(config_path, audit.var_builder(DType::F32))?;
        Ok(audit.mismatches(&|name| self.ignorable(name)))
    }

    /// The var builder over a component folder's weights.
    pub fn var_builder(
        self,
        folder: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        WeightFiles::find(folder)?.var_builder(self.aliases(), dtype, device)
    }
}

/// How to load a model folder.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Load the CLIP image encoder (needed by StyleDiffusion, not by text-to-image).
    pub image_encoder: bool,
    /// A separate image encoder folder (`CLIPVisionModel[WithProjection]` or a full CLIPModel checkpoint);
    /// defaults to `<model>/image_encoder`.
    pub image_encoder_path: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            image_encoder: false,
            image_encoder_path: None,
        }
    }
}

/// Where a pipeline's weights and configs are.
#[derive(Clone, Debug)]
pub enum ModelLocation {
    /// A folder in the diffusers layout.
    Folder(PathBuf),
    /// An original-layout single-file checkpoint, read with the configs, tokenizer and scheduler of a diffusers
    /// folder (its weights, if any, are not used).
    SingleFile { file: PathBuf, configs: PathBuf },
}

impl ModelLocation {
    /// The folder whose configs, tokenizer and scheduler are used.
    pub fn config_root(&self) -> &Path {
        match self {
            Self::Folder(root) => root,
            Self::SingleFile { configs, .. } => configs,
        }
    }

    /// A short identity of the weights and configs (see [`model_identity`]).
    pub fn identity(&self) -> Result<String> {
        match self {
            Self::Folder(root) => model_identity(root),
            Self::SingleFile { file, configs } => {
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                h.update(b"single-file");
                h.update(file_fingerprint(file)?);
                for c in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
                    let dir = configs.join(c);
                    for name in [
                        "config.json",
                        "scheduler_config.json",
                        "vocab.json",
                        "merges.txt",
                    ] {
                        if let Ok(bytes) = std::fs::read(dir.join(name)) {
                            h.update(c.as_bytes());
                            h.update(name.as_bytes());
                            h.update(&bytes);
                        }
                    }
                }
                Ok(crate::image_io::hex(&h.finalize()))
            }
        }
    }

    /// The var builder of one component.
    fn var_builder(
        &self,
        kind: ComponentKind,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        match self {
            Self::Folder(root) => {
                let dir = root.join(kind.folder_name());
                require_dir(&dir, kind.folder_name())?;
                kind.var_builder(&dir, dtype, device)
            }
            Self::SingleFile { file, configs } => {
                let aliases = kind
                    .single_file_aliases(&configs.join(kind.folder_name()).join("config.json"))?;
                WeightFiles::single(file)?.var_builder(aliases, dtype, device)
            }
        }
    }
}

/// A loaded Stable Diffusion pipeline.
pub struct StableDiffusion {
    pub root: PathBuf,
    /// A short identity of the weights and configs ([`ModelLocation::identity`]): inversions record it, and edits
    /// refuse an inversion made with another model.
    pub model_id: String,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextTransformer,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub scheduler: Ddim,
    pub image_encoder: Option<ClipVisionTransformer>,
    pub dtype: DType,
    pub device: Device,
}

fn require_dir(path: &Path, what: &str) -> Result<()> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(Error::file(path, format!("missing {what} folder")))
    }
}

impl StableDiffusion {
    /// Loads a pipeline folder in the diffusers layout.
    pub fn load(root: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_from(&ModelLocation::Folder(root.to_path_buf()), opts)
    }

    /// Loads a pipeline from a folder or a single-file checkpoint.
    pub fn load_from(location: &ModelLocation, opts: &LoadOptions) -> Result<Self> {
        let root = location.config_root();
        require_dir(root, "model")?;
        if let ModelLocation::Folder(root) = location {
            let index = root.join("model_index.json");
            if !index.is_file() {
                return Err(Error::file(
                    root,
                    "not a diffusers pipeline folder: model_index.json is missing",
                ));
            }
        }
        let (dtype, device) = (opts.dtype, &opts.device);
        if dtype == DType::BF16 && device.is_cpu() {
            return Err(Error::invalid(
                "dtype",
                "bf16 compute is not available on the CPU (candle has no bf16 matmul there); use f32 or f16 (bf16 weight files load fine)",
            ));
        }
        let config = |kind: ComponentKind| -> Result<PathBuf> {
            let dir = root.join(kind.folder_name());
            require_dir(&dir, kind.folder_name())?;
            Ok(dir.join("config.json"))
        };
        let tok_dir = root.join("tokenizer");
        require_dir(&tok_dir, "tokenizer")?;
        let tokenizer = ClipTokenizer::from_folder(&tok_dir)?;

        let text_cfg = ClipTextConfig::load(&config(ComponentKind::TextEncoder)?)?;
        let text_encoder = ClipTextTransformer::load(
            &text_cfg,
            location.var_builder(ComponentKind::TextEncoder, dtype, device)?,
        )?;

        let unet_cfg = UNetConfig::load(&config(ComponentKind::Unet)?)?;
        let unet = UNet2DConditionModel::load(
            &unet_cfg,
            location.var_builder(ComponentKind::Unet, dtype, device)?,
        )?;
        if unet_cfg.cross_attention_dim != text_cfg.hidden_size {
            return Err(Error::file(
                root,
                format!(
                    "unet cross_attention_dim {} does not match the text encoder width {}",
                    unet_cfg.cross_attention_dim, text_cfg.hidden_size
                ),
            ));
        }

        let vae = AutoencoderKL::load(
            &VaeConfig::load(&config(ComponentKind::Vae)?)?,
            location.var_builder(ComponentKind::Vae, dtype, device)?,
        )?;

        let sched_path = root.join("scheduler").join("scheduler_config.json");
        let scheduler_config = if sched_path.is_file() {
            SchedulerConfig::load(&sched_path)?
        } else {
            SchedulerConfig::stable_diffusion()
        };
        let scheduler = Ddim::new(&scheduler_config).map_err(|m| Error::file(&sched_path, m))?;

        let image_encoder = if opts.image_encoder {
            let dir = match (&opts.image_encoder_path, location) {
                (Some(p), _) => p.clone(),
                (None, ModelLocation::Folder(root)) => root.join("image_encoder"),
                (None, ModelLocation::SingleFile { file, .. }) => {
                    return Err(Error::file(
                        file,
                        "a single-file checkpoint holds no CLIP image encoder, which StyleDiffusion needs: give one (LoadOptions::image_encoder_path; the command line's --image-encoder DIR or a hub id such as openai/clip-vit-base-patch16)",
                    ));
                }
            };
            Some(load_image_encoder(&dir, dtype, device)?)
        } else {
            None
        };
        Ok(Self {
            root: root.to_path_buf(),
            model_id: location.identity()?,
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            scheduler,
            image_encoder,
            dtype,
            device: device.clone(),
        })
    }

    /// Text embedding (1, 77, width) of a prompt, in the compute dtype.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        self.tokenizer.check_length(prompt)?;
        let ids = self.tokenizer.encode_padded(prompt)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    /// Native image size in pixels: the UNet's sample size times the VAE's downscale.
    pub fn native_size(&self) -> usize {
        self.unet.config().sample_size * self.vae.config().downscale()
    }

    /// A lower bound of the working memory (beyond the loaded weights) of denoising `batch` latents of
    /// `(h, w)` positions and decoding them: the largest self-attention scores and probabilities (all of them
    /// at once when `backward` keeps them for the gradient), the UNet's widest activations, and the VAE
    /// decoder's full-resolution activations. Used to refuse runs that cannot fit before they start.
    pub fn estimate_working_memory(
        &self,
        batch: usize,
        (h, w): (usize, usize),
        backward: bool,
    ) -> u64 {
        let elt = self.dtype.size_in_bytes() as u64;
        let cfg = self.unet.config();
        let heads = cfg
            .plan(std::path::Path::new("unet/config.json"))
            .map(|p| p.heads)
            .unwrap_or_else(|_| vec![1; cfg.block_out_channels.len()]);
        let q = (h * w) as u64;
        let b = batch as u64;
        let per_level: Vec<u64> = heads
            .iter()
            .enumerate()
            .map(|(level, &heads)| {
                let ql = q >> (2 * level);
                2 * b * heads as u64 * ql * ql * elt
            })
            .collect();
        let attention = if backward {
            // Every transformer block (down, up) keeps its probabilities for the backward pass.
            per_level.iter().sum::<u64>() * (2 * cfg.layers_per_block as u64 + 1)
        } else {
            per_level.iter().copied().max().unwrap_or(0)
        };
        let unet_activations = 8 * b * cfg.block_out_channels[0] as u64 * q * elt;
        let f = self.vae.config().downscale() as u64;
        let vae_width = self.vae.config().block_out_channels[0] as u64;
        let vae_decode = 3 * b * vae_width * q * f * f * elt;
        attention + unet_activations.max(vae_decode)
    }

    pub fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

    /// The CLIP image tokens StyleDiffusion maps from: post-layernormed, all tokens, (T, D) f32.
    pub fn image_tokens(&self, image: &Tensor) -> Result<Tensor> {
        let enc = self.image_encoder.as_ref().ok_or_else(|| {
            Error::invalid(
                "image encoder",
                "StyleDiffusion needs a CLIP image encoder: put one in <model>/image_encoder or load one with LoadOptions::image_encoder_path",
            )
        })?;
        let size = enc.image_size();
        let (_, _, h, _) = image.dims4()?;
        let pixels = if h == size {
            clip::vision::clip_normalize(&image.to_dtype(DType::F32)?)?
        } else {
            let rgb = crate::util::tensor_to_image(image)?;
            clip::vision::preprocess(&image::DynamicImage::ImageRgb8(rgb), size, &self.device)?
        };
        let out = enc.forward(&pixels.to_dtype(self.dtype)?)?;
        Ok(out.tokens.get(0)?.to_dtype(DType::F32)?)
    }
}

/// The CLIP image encoder from a folder holding its config.json and weights.
pub fn load_image_encoder(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<ClipVisionTransformer> {
    require_dir(dir, "image encoder")?;
    let cfg = ClipVisionConfig::load(&dir.join("config.json"))?;
    ClipVisionTransformer::load(
        &cfg,
        ComponentKind::ImageEncoder.var_builder(dir, dtype, device)?,
    )
}

/// A dtype as inversions and reports name it: "f32", "f16", "bf16".
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// A device as inversions and reports name it: "cpu", "cuda:0", "metal:0".
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// An identity of a model folder: SHA-256 over every component's config, each weight file's size, safetensors
/// header and first and last 64 KiB. Cheap even for SD-sized files, and different for any retrained model.
pub fn model_identity(root: &Path) -> Result<String> {
    use sha2::Digest;

    let mut hasher = sha2::Sha256::new();
    for name in [
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "image_encoder",
    ] {
        let dir = root.join(name);
        if !dir.is_dir() {
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| Error::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        for f in files {
            let io = |source| Error::Io {
                path: f.clone(),
                source,
            };
            hasher.update(
                f.strip_prefix(root)
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .as_bytes(),
            );
            let _ = io;
            hasher.update(file_fingerprint(&f)?);
        }
    }
    Ok(crate::image_io::hex(&hasher.finalize()))
}

/// A file's length, first and last 64 KiB (a safetensors header and both ends of its data), as hashed bytes.
fn file_fingerprint(f: &Path) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |source| Error::Io {
        path: f.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    let mut file = std::fs::File::open(f).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    out.extend(len.to_le_bytes());
    let mut chunk = vec![0u8; (len.min(65536)) as usize];
    file.read_exact(&mut chunk).map_err(io)?;
    out.extend(&chunk);
    if len > 65536 {
        file.seek(SeekFrom::End(-65536)).map_err(io)?;
        file.read_exact(&mut chunk).map_err(io)?;
        out.extend(&chunk);
    }
    Ok(out)
}
