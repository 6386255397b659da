//! `hone serve`: parses the options and runs `hone::serve`, printing where it listens.
//!
//! It must not hold any server logic: the library does.

use crate::{Cli, ServeArgs};
use anyhow::Result;
use hone::home::Home;
use std::io::Write as _;

pub fn run(cli: &Cli, a: &ServeArgs) -> Result<()> {
    let home = Home::from_env()?;
    home.ensure()?;
    // main() set the thread count for the pool; the model thread adopts it.
    let threads = hone::sys::threads_set();
    let opts = hone::serve::ServeOptions {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone(),
        model: cli.model.clone(),
        ctx: cli.ctx,
        backend: super::backend(cli.backend),
        threads,
        parallel: usize::from(a.parallel),
        prompt_cache_bytes: usize::try_from(a.prompt_cache).unwrap_or(usize::MAX),
        device: cli.device.clone(),
        retrieval: !a.no_retrieval,
        limits: hone::serve::Limits {
            max_body_bytes: a.max_body_bytes,
            write_timeout: std::time::Duration::from_secs(a.write_timeout),
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
