//! The studio: `stylediff serve`, a local web app over the [`crate::Editor`]. One process holds one loaded model;
//! a job queue with one worker runs inversions, edits and attention maps in order; the page and any script use the
//! same JSON API (docs/api.md). Inversions are kept on disk, content-addressed ([`store`]), so a restart loses
//! nothing.
//!
//! Safety: it binds to 127.0.0.1 unless told otherwise, and then only with a token, checked on every request; an
//! upload is limited in bytes and pixels; no path comes from a request (ids are hex, checked); a request from
//! another origin is refused; a full queue answers 503; a failed or cancelled job writes nothing.

pub mod jobs;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use jobs::{Jobs, Work};
use store::Store;

use crate::{EditMode, EditSettings, Editor, InversionSettings, Method};

/// Largest upload the server reads, in bytes.
pub const MAX_UPLOAD_BYTES: usize = 20 << 20;

/// How `serve` runs.
pub struct StudioConfig {
    pub host: std::net::IpAddr,
    pub port: u16,
    /// Required on every request when set (`Authorization: Bearer TOKEN`); required to bind beyond loopback.
    pub token: Option<String>,
    /// Where inversions and edits are kept.
    pub data_dir: PathBuf,
    /// Jobs that may wait in the queue.
    pub queue_capacity: usize,
    /// Whether the model is the bundled toy model (the page then offers toy scenes drawn from a caption).
    pub toy: bool,
}

struct App {
    jobs: Jobs,
    store: Arc<Store>,
    /// Shared with the worker: requests use it only for the cheap checks (prompts, words, numbers).
    editor: Arc<Editor>,
    token: Option<String>,
    toy: bool,
}

/// An error as the API answers it: a status and `{ "error": message, "field": name }`.
struct ApiError {
    status: StatusCode,
    field: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn bad(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            field: Some(field),
            message: message.into(),
        }
    }

    fn status(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            field: None,
            message: message.into(),
        }
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        let field = match &e {
            crate::Error::Invalid { what, .. } => Some(*what),
            _ => None,
        };
        Self {
            status: StatusCode::BAD_REQUEST,
            field,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message, "field": self.field })),
        )
            .into_response()
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Loads nothing itself: serves `editor` at `config`'s address until the process ends. `on_ready` gets the URL
/// once the socket is bound (port 0 picks a free one).
pub fn serve(
    editor: Editor,
    config: StudioConfig,
    on_ready: impl FnOnce(&str),
) -> crate::Result<()> {
    if !config.host.is_loopback() && config.token.as_deref().is_none_or(str::is_empty) {
        return Err(crate::Error::invalid(
            "host",
            format!(
                "{}: serving beyond this machine needs a token (--token or STYLEDIFF_TOKEN), checked on every request",
                config.host
            ),
        ));
    }
    crate::limits::count_in("queue capacity", config.queue_capacity, 1, 10_000)?;
    let store = Arc::new(Store::open(&config.data_dir)?);
    let editor = Arc::new(editor);
    let app = Arc::new(App {
        jobs: Jobs::start(editor.clone(), store.clone(), config.queue_capacity),
        editor,
        store,
        token: config.token.clone(),
        toy: config.toy,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| crate::Error::invalid("server", e.to_string()))?;
    runtime.block_on(async move {
        let addr = SocketAddr::new(config.host, config.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| crate::Error::invalid("port", format!("cannot listen on {addr}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| crate::Error::invalid("port", e.to_string()))?;
        on_ready(&format!("http://{bound}/"));
        axum::serve(listener, router(app))
            .await
            .map_err(|e| crate::Error::invalid("server", e.to_string()))
    })
}

fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/api/info", get(info))
        .route("/api/toy-scene", post(toy_scene))
        .route(
            "/api/inversions",
            get(list_inversions).post(start_inversion),
        )
        .route("/api/inversions/{id}/{image}", get(image))
        .route("/api/edits", post(start_edit))
        .route("/api/maps", post(start_maps))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Every request: the token when one is set, and no cross-origin request (a page elsewhere must not drive it).
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
            .or_else(|| {
                req.uri().query().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("token=").map(str::to_string))
                })
            });
        if given.as_deref() != Some(token.as_str()) {
            return ApiError::status(
                StatusCode::UNAUTHORIZED,
                "a valid token is required (Authorization: Bearer TOKEN)",
            )
            .into_response();
        }
    }
    if let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o == host);
        if !same {
            return ApiError::status(
                StatusCode::FORBIDDEN,
                format!("cross-origin requests are refused ({origin})"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn info(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let d = InversionSettings::new(Method::StyleDiffusion);
    let e = EditSettings::new("");
    Json(serde_json::json!({
        "model_id": app.editor.model_id(),
        "native_size": app.editor.native_size(),
        "toy": app.toy,
        "stylediff_version": env!("CARGO_PKG_VERSION"),
        "max_upload_bytes": MAX_UPLOAD_BYTES,
        "defaults": {
            "method": "stylediffusion", "steps": d.steps, "inner_steps": d.inner_steps, "guidance": d.guidance,
            "tau_v": e.tau_v, "tau_c": e.tau_c, "tau_s": e.tau_s, "tau_u": e.tau_u,
        },
        "methods": Method::ALL.map(Method::name),
    }))
}

#[derive(serde::Deserialize)]
struct ToyScene {
    caption: String,
    #[serde(default)]
    layout_seed: u64,
}

async fn toy_scene(State(app): State<Arc<App>>, Json(req): Json<ToyScene>) -> ApiResult<Response> {
    if !app.toy {
        return Err(ApiError::bad(
            "caption",
            "toy scenes are for the bundled toy model",
        ));
    }
    let rgb = crate::toy::render_caption(&req.caption, req.layout_seed)
        .map_err(|e| ApiError::bad("caption", e.to_string()))?;
    png_response(&rgb)
}

fn png_response(rgb: &image::RgbImage) -> ApiResult<Response> {
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(rgb.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
}

fn number<T: std::str::FromStr>(field: &'static str, text: &str) -> ApiResult<T> {
    text.trim()
        .parse()
        .map_err(|_| ApiError::bad(field, format!("{text:?} is not a number")))
}

/// `multipart/form-data`: `image` (the photo's bytes), `prompt`, and optionally `method`, `steps`,
/// `inner_steps`, `guidance`.
async fn start_inversion(State(app): State<Arc<App>>, mut form: Multipart) -> ApiResult<Response> {
    let mut photo: Option<Vec<u8>> = None;
    let mut prompt: Option<String> = None;
    let mut settings = InversionSettings::new(Method::StyleDiffusion);
    let mut inner: Option<usize> = None;
    // Reading the form fails with 413 once the upload passes MAX_UPLOAD_BYTES.
    let form_error = |e: axum::extract::multipart::MultipartError| ApiError {
        status: e.status(),
        field: Some("image"),
        message: format!(
            "{} (uploads are limited to {} MiB)",
            e.body_text(),
            MAX_UPLOAD_BYTES >> 20
        ),
    };
    while let Some(field) = form.next_field().await.map_err(form_error)? {
        let name = field.name().unwrap_or("").to_string();
        let bytes = field.bytes().await.map_err(form_error)?;
        let text = || String::from_utf8_lossy(&bytes).to_string();
        match name.as_str() {
            "image" => photo = Some(bytes.to_vec()),
            "prompt" => prompt = Some(text()),
            "method" => {
                let m = Method::from_name(text().trim())?;
                let keep = (settings.steps, settings.guidance);
                settings = InversionSettings::new(m);
                (settings.steps, settings.guidance) = keep;
            }
            "steps" => settings.steps = number("steps", &text())?,
            "inner_steps" => inner = Some(number("inner_steps", &text())?),
            "guidance" => settings.guidance = number("guidance", &text())?,
            other => return Err(ApiError::bad("form", format!("unknown field {other:?}"))),
        }
    }
    if let Some(k) = inner {
        settings.inner_steps = k;
    }
    let photo = photo.ok_or_else(|| ApiError::bad("image", "no image in the form"))?;
    let prompt = prompt.ok_or_else(|| ApiError::bad("prompt", "no prompt in the form"))?;
    app.editor.check_inversion(&prompt, &settings)?;
    let rgb = crate::image_io::decode_rgb(&photo, std::path::Path::new("upload"))
        .map_err(|e| ApiError::bad("image", e.to_string()))?;
    queue(
        &app,
        Work::Invert {
            photo: rgb,
            prompt,
            settings,
        },
    )
}

fn queue(app: &App, work: Work) -> ApiResult<Response> {
    match app.jobs.submit(work) {
        Ok(id) => {
            Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "job": id }))).into_response())
        }
        Err(jobs::QueueFull) => Err(ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the job queue is full; try again when a job has finished",
        )),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EditRequest {
    inversion: String,
    target: String,
    #[serde(default)]
    mode: Option<String>,
    /// Source words and target words of the local blend.
    #[serde(default)]
    blend: Option<(Vec<String>, Vec<String>)>,
    #[serde(default)]
    reweight: Vec<(String, f64)>,
    #[serde(default)]
    cross_words: Vec<(String, f64)>,
    tau_v: Option<f64>,
    tau_c: Option<f64>,
    tau_s: Option<f64>,
    tau_u: Option<f64>,
}

async fn start_edit(State(app): State<Arc<App>>, body: axum::body::Bytes) -> ApiResult<Response> {
    let req: EditRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad("edit", e.to_string()))?;
    if !app.store.exists(&req.inversion) {
        store::check_id("inversion", &req.inversion)?;
        return Err(ApiError::status(
            StatusCode::NOT_FOUND,
            format!("inversion {} is not known here", req.inversion),
        ));
    }
    let mut s = EditSettings::new(req.target);
    s.mode = EditMode::from_name(req.mode.as_deref().unwrap_or("auto"))?;
    s.blend = req.blend;
    s.reweight = req.reweight;
    s.cross_words = req.cross_words;
    for (value, slot) in [
        (req.tau_v, &mut s.tau_v),
        (req.tau_c, &mut s.tau_c),
        (req.tau_s, &mut s.tau_s),
        (req.tau_u, &mut s.tau_u),
    ] {
        if let Some(v) = value {
            *slot = v;
        }
    }
    // Numbers, prompt lengths and every word against its prompt, before the job waits in the queue.
    let inv = app.store.load(&req.inversion, &app.editor.model().device)?;
    inv.check_fits(app.editor.model())?;
    app.editor
        .check_edit(&inv.source_prompt, inv.settings.steps, &s)?;
    queue(
        &app,
        Work::Edit {
            inversion: req.inversion,
            settings: s,
        },
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MapsRequest {
    inversion: String,
    #[serde(default)]
    prompt: Option<String>,
}

async fn start_maps(State(app): State<Arc<App>>, body: axum::body::Bytes) -> ApiResult<Response> {
    let req: MapsRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad("maps", e.to_string()))?;
    store::check_id("inversion", &req.inversion)?;
    if !app.store.exists(&req.inversion) {
        return Err(ApiError::status(
            StatusCode::NOT_FOUND,
            format!("inversion {} is not known here", req.inversion),
        ));
    }
    if let Some(p) = &req.prompt {
        app.editor.model().tokenizer.check_length(p)?;
    }
    queue(
        &app,
        Work::Maps {
            inversion: req.inversion,
            prompt: req.prompt,
        },
    )
}

async fn list_inversions(State(app): State<Arc<App>>) -> Json<Vec<store::InversionSummary>> {
    Json(app.store.list())
}

async fn image(
    State(app): State<Arc<App>>,
    Path((id, image)): Path<(String, String)>,
) -> ApiResult<Response> {
    let name = image.strip_suffix(".png").unwrap_or(&image);
    let path = app
        .store
        .image_path(&id, name)
        .map_err(|e| ApiError::status(StatusCode::NOT_FOUND, e.to_string()))?;
    let bytes =
        std::fs::read(&path).map_err(|e| ApiError::status(StatusCode::NOT_FOUND, e.to_string()))?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "image/png".parse().expect("valid"));
    Ok((headers, bytes).into_response())
}

#[derive(serde::Deserialize)]
struct Since {
    #[serde(default)]
    since: usize,
}

async fn job(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> ApiResult<Json<jobs::JobView>> {
    app.jobs.view(&id, q.since).map(Json).ok_or_else(|| {
        ApiError::status(StatusCode::NOT_FOUND, format!("job {id} is not known here"))
    })
}

async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    if app.jobs.cancel(&id) {
        Ok(Json(serde_json::json!({ "job": id, "cancelled": true })))
    } else {
        Err(ApiError::status(
            StatusCode::NOT_FOUND,
            format!("job {id} is not known here"),
        ))
    }
}
