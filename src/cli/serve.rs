//! `hone serve`: parses the options and runs `hone::serve`, printing where it listens.
//!
//! It must not hold any server logic: the library does.

use crate::Cli;
use anyhow::Result;
use clap::Args;
use hone::home::Home;
use std::io::Write as _;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on; anything but loopback needs --api-key
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY`
    #[arg(long, env = "HONE_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body in bytes
    #[arg(long, default_value_t = 1 << 20, hide = true)]
    pub max_body_bytes: usize,
}

pub fn run(cli: &Cli, a: &ServeArgs) -> Result<()> {
    let home = Home::from_env()?;
    home.ensure()?;
    // main() set the thread count for the pool; the model thread adopts it.
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let opts = hone::serve::ServeOptions {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone(),
        model: cli.model.clone(),
        ctx: cli.ctx,
        backend: super::backend(cli.backend),
        threads,
        device: cli.device.clone(),
        limits: hone::serve::Limits {
            max_body_bytes: a.max_body_bytes,
            ..Default::default()
        },
    };
    hone::serve::run(home, opts, &mut |addr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "hone serve: listening on http://{addr} (OpenAI API at http://{addr}/v1; Ctrl-C stops)"
        );
        let _ = out.flush();
    })
}
