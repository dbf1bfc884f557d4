//! `serve`: the web studio on one loaded model.

use std::path::PathBuf;

use super::ModelArgs;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// CLIP image encoder (folder or hub id) when the model has no image_encoder/ (StyleDiffusion only).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    image_encoder: Option<PathBuf>,
    /// Address to listen on. Anything but loopback needs --token.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0 picks a free one; the URL is printed).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// A token every request must carry (Authorization: Bearer TOKEN; the page reads it from #token=...).
    /// Also read from STYLEDIFF_TOKEN.
    #[arg(long, env = "STYLEDIFF_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where inversions and edits are kept (content-addressed; a restart lists them again).
    #[arg(long, value_name = "DIR", default_value = "stylediff-studio")]
    data_dir: PathBuf,
    /// Jobs that may wait in the queue; more are answered 503.
    #[arg(long, default_value_t = 16)]
    queue: usize,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let location = a.model.location()?;
    let encoder = a.model.image_encoder(a.image_encoder.as_ref())?;
    let mut opts = a.model.load_options()?;
    opts.image_encoder = true;
    opts.image_encoder_path = encoder;
    let editor = stylediff::Editor::load_from(&location, &opts)?;
    let config = stylediff::studio::StudioConfig {
        host: a.host,
        port: a.port,
        token: a.token.filter(|t| !t.is_empty()),
        data_dir: a.data_dir,
        queue_capacity: a.queue,
        toy: a.model.is_toy(),
    };
    let with_token = config.token.is_some();
    stylediff::studio::serve(editor, config, |url| {
        let hint = if with_token { "#token=YOUR_TOKEN" } else { "" };
        println!("stylediff studio: {url}{hint}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
