//! The daemon as a service that starts at login, for `hone daemon install|uninstall`: where this
//! OS's service manager looks for the user's service file ([`ServiceFile`]), writing it 0600
//! ([`install`]; its text is `daemon_lock::unit_files`), removing it and the link that starts
//! it ([`ServiceFile::remove`]), and the service manager's commands, as argument lists to run
//! ([`run_command`]) or as lines to show.
//!
//! [`install_and_tell`] and [`uninstall_and_tell`] are the two commands whole: they hand every
//! line the user should see (each command echoed before it runs, the ones to run by hand) to the
//! caller, which prints them.
//!
//! It must NOT print, start the daemon itself, or run `systemctl`/`launchctl` unless asked to:
//! the service manager's commands run only for `now` (`--now`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::daemon_lock::{self, InstallPaths, ServiceManager};
use crate::home::Home;
use crate::schedule::Schedule;
use crate::store::Store;

/// The user's service file for this OS's service manager.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceFile {
    pub manager: ServiceManager,
    /// Where the file goes for `manager`.
    pub path: PathBuf,
    /// Where it would go for each manager.
    pub paths: InstallPaths,
}

impl ServiceFile {
    /// Where the file goes for the user whose home folder is `user_home` (`xdg_config_home`:
    /// `$XDG_CONFIG_HOME` if set).
    pub fn at(user_home: &Path, xdg_config_home: Option<&Path>) -> ServiceFile {
        let paths = daemon_lock::install_paths(user_home, xdg_config_home);
        let manager = ServiceManager::for_this_os();
        let path = match manager {
            ServiceManager::Systemd => paths.systemd_unit.clone(),
            ServiceManager::Launchd => paths.launchd_plist.clone(),
        };
        ServiceFile {
            manager,
            path,
            paths,
        }
    }

    /// Where the file goes for the user running hone (`$HOME`, `$XDG_CONFIG_HOME`).
    pub fn for_this_user() -> Result<ServiceFile> {
        let user_home = dirs::home_dir().context(
            "cannot tell your home folder; set HOME so hone knows where service files go",
        )?;
        let xdg = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        Ok(ServiceFile::at(&user_home, xdg.as_deref()))
    }

    /// The commands that start the installed service now and at every login, to run.
    pub fn enable_now(&self) -> Vec<Vec<String>> {
        match self.manager {
            ServiceManager::Systemd => vec![
                args(&["systemctl", "--user", "daemon-reload"]),
                args(&[
                    "systemctl",
                    "--user",
                    "enable",
                    "--now",
                    daemon_lock::SYSTEMD_UNIT,
                ]),
            ],
            ServiceManager::Launchd => vec![vec![
                "launchctl".into(),
                "bootstrap".into(),
                format!("gui/{}", uid()),
                self.path.to_string_lossy().into_owned(),
            ]],
        }
    }

    /// The same, as lines for the user to run (with the optional ones).
    pub fn enable_lines(&self) -> Vec<String> {
        daemon_lock::enable_commands(self.manager, &self.paths, uid())
    }

    /// The command that stops the service and keeps it from starting again, to run before
    /// the file is removed.
    pub fn disable_now(&self) -> Vec<String> {
        match self.manager {
            ServiceManager::Systemd => args(&[
                "systemctl",
                "--user",
                "disable",
                "--now",
                daemon_lock::SYSTEMD_UNIT,
            ]),
            ServiceManager::Launchd => vec![
                "launchctl".into(),
                "bootout".into(),
                format!("gui/{}/{}", uid(), daemon_lock::LAUNCHD_LABEL),
            ],
        }
    }

    /// The commands that make the service manager forget the removed file, to run.
    pub fn forget_now(&self) -> Vec<Vec<String>> {
        match self.manager {
            ServiceManager::Systemd => vec![args(&["systemctl", "--user", "daemon-reload"])],
            ServiceManager::Launchd => Vec::new(),
        }
    }

    /// The lines for the user to run to stop a daemon the service started, once its file is
    /// removed.
    pub fn stop_lines(&self) -> Vec<String> {
        match self.manager {
            ServiceManager::Systemd => vec![
                format!("systemctl --user stop {}", daemon_lock::SYSTEMD_UNIT),
                "systemctl --user daemon-reload".into(),
            ],
            ServiceManager::Launchd => daemon_lock::disable_commands(self.manager, uid()),
        }
    }

    /// Removes the file and, for systemd, the link that starts it at login (what
    /// `systemctl disable` removes: left behind, it would point at nothing).
    pub fn remove(&self) -> Result<Removed> {
        let file = daemon_lock::remove_unit(&self.path)?;
        let mut link = None;
        if self.manager == ServiceManager::Systemd {
            if let Some(dir) = self.path.parent() {
                let l = dir
                    .join("default.target.wants")
                    .join(daemon_lock::SYSTEMD_UNIT);
                if l.symlink_metadata().is_ok() {
                    std::fs::remove_file(&l)
                        .with_context(|| format!("cannot remove {}", l.display()))?;
                    link = Some(l);
                }
            }
        }
        Ok(Removed { file, link })
    }
}

/// What [`ServiceFile::remove`] removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    /// Whether the file was there.
    pub file: bool,
    /// The link that started it at login, if there was one.
    pub link: Option<PathBuf>,
}

/// What [`install`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Installed {
    pub file: ServiceFile,
    /// The hone executable it runs.
    pub exe: PathBuf,
    /// The data directory it runs for (`HONE_HOME`), resolved.
    pub home: PathBuf,
}

/// Writes the user's service file (0600) that runs this executable's `daemon run` for `home`
/// at the stored schedule's CPU priority.
pub fn install(home: &Home) -> Result<Installed> {
    install_with(home, ServiceFile::for_this_user)
}

fn install_with(home: &Home, locate: impl FnOnce() -> Result<ServiceFile>) -> Result<Installed> {
    let root = std::fs::canonicalize(home.root()).with_context(|| {
        format!(
            "cannot resolve the data directory {}",
            home.root().display()
        )
    })?;
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("cannot find the path of the running hone executable")?;
    let store = Store::open(&home.db_path())?;
    let schedule = Schedule::load(&store)?;
    let units = daemon_lock::unit_files(&exe, &root, schedule.nice)?;
    let file = locate()?;
    let text = match file.manager {
        ServiceManager::Systemd => &units.systemd_unit,
        ServiceManager::Launchd => &units.launchd_plist,
    };
    daemon_lock::write_unit(&file.path, text)?;
    set_private(&file.path)?;
    Ok(Installed {
        file,
        exe,
        home: root,
    })
}

/// `hone daemon install`: writes the service file, then with `now` runs the commands that turn
/// it on (each echoed to `say` first), else hands `say` the lines to run by hand.
pub fn install_and_tell(home: &Home, now: bool, say: &mut dyn FnMut(&str)) -> Result<()> {
    let done = install(home)?;
    say(&format!(
        "wrote {} (runs {} daemon run with HONE_HOME={})",
        done.file.path.display(),
        done.exe.display(),
        done.home.display()
    ));
    if now {
        for c in done.file.enable_now() {
            echo_and_run(&c, say)?;
        }
        say("the daemon is on; `hone daemon status` shows what it does");
    } else {
        say("to start it now and at every login, run:");
        for c in done.file.enable_lines() {
            say(&format!("  {c}"));
        }
        say("(or `hone daemon install --now` runs them)");
    }
    Ok(())
}

/// `hone daemon uninstall`: with `now` stops and disables the service first (a failure is
/// handed to `warn`, and the file is removed anyway), removes the service file and its link,
/// then with `now` has the manager forget it, else hands `say` the lines that stop it.
pub fn uninstall_and_tell(
    now: bool,
    say: &mut dyn FnMut(&str),
    warn: &mut dyn FnMut(&str),
) -> Result<()> {
    let file = ServiceFile::for_this_user()?;
    if now {
        if let Err(e) = echo_and_run(&file.disable_now(), say) {
            warn(&format!("warning: {e:#}; removing the service file anyway"));
        }
    }
    let removed = file.remove()?;
    if removed.file {
        say(&format!("removed {}", file.path.display()));
    } else {
        say(&format!("no service file at {}", file.path.display()));
    }
    if let Some(l) = removed.link {
        say(&format!("removed {}", l.display()));
    }
    if now {
        for c in file.forget_now() {
            echo_and_run(&c, say)?;
        }
    } else {
        say("if the daemon is running as a service, stop it with:");
        for c in file.stop_lines() {
            say(&format!("  {c}"));
        }
    }
    Ok(())
}

/// Runs one service-manager command, echoing it to `say` first.
fn echo_and_run(args: &[String], say: &mut dyn FnMut(&str)) -> Result<()> {
    say(&format!("$ {}", args.join(" ")));
    run_command(args)
}

/// Runs one service-manager command (`args[0]` with the rest as its arguments); the error says
/// what to do instead.
pub fn run_command(args: &[String]) -> Result<()> {
    let Some((program, rest)) = args.split_first() else {
        anyhow::bail!("no command to run");
    };
    let status = std::process::Command::new(program)
        .args(rest)
        .status()
        .with_context(|| {
            format!(
                "cannot run {program}; is it installed? Run the commands yourself instead (without --now)"
            )
        })?;
    if !status.success() {
        anyhow::bail!(
            "`{}` failed ({status}); fix what it said, or run the commands yourself",
            args.join(" ")
        );
    }
    Ok(())
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The user's uid (for launchd's `gui/UID` domain).
fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

fn set_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private (0600)", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn install_writes_a_private_file_naming_the_exe_and_home() {
        let data = tempfile::tempdir().unwrap();
        let user = tempfile::tempdir().unwrap();
        let home = Home::at(data.path().to_path_buf());
        home.ensure().unwrap();
        let cfg = user.path().join("cfg");
        let at = ServiceFile::at(user.path(), Some(&cfg));
        let done = install_with(&home, || Ok(at.clone())).unwrap();
        assert_eq!(done.file, at);
        assert_eq!(done.home, std::fs::canonicalize(data.path()).unwrap());
        let text = std::fs::read_to_string(&at.path).unwrap();
        assert!(text.contains(&done.exe.display().to_string()), "{text}");
        assert!(text.contains(&done.home.display().to_string()), "{text}");
        let mode = std::fs::metadata(&at.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Where it cannot be told, nothing is written.
        let e = install_with(&home, || anyhow::bail!("no HOME")).unwrap_err();
        assert!(e.to_string().contains("no HOME"), "{e}");
    }

    #[test]
    fn remove_takes_the_file_and_the_login_link() {
        let user = tempfile::tempdir().unwrap();
        let mut f = ServiceFile::at(user.path(), None);
        f.manager = ServiceManager::Systemd;
        f.path = f.paths.systemd_unit.clone();
        daemon_lock::write_unit(&f.path, "x").unwrap();
        let wants = f.path.parent().unwrap().join("default.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        let link = wants.join(daemon_lock::SYSTEMD_UNIT);
        std::os::unix::fs::symlink(&f.path, &link).unwrap();
        let r = f.remove().unwrap();
        assert_eq!(
            r,
            Removed {
                file: true,
                link: Some(link.clone())
            }
        );
        assert!(!f.path.exists() && link.symlink_metadata().is_err());
        assert_eq!(
            f.remove().unwrap(),
            Removed {
                file: false,
                link: None
            }
        );
    }

    #[test]
    fn the_commands_for_each_service_manager() {
        let mut f = ServiceFile::at(Path::new("/home/ada"), None);
        f.manager = ServiceManager::Systemd;
        f.path = f.paths.systemd_unit.clone();
        let joined = |v: Vec<Vec<String>>| v.iter().map(|c| c.join(" ")).collect::<Vec<_>>();
        assert_eq!(
            joined(f.enable_now()),
            [
                "systemctl --user daemon-reload",
                "systemctl --user enable --now hone.service"
            ]
        );
        assert_eq!(
            f.disable_now().join(" "),
            "systemctl --user disable --now hone.service"
        );
        assert_eq!(joined(f.forget_now()), ["systemctl --user daemon-reload"]);
        assert_eq!(
            f.stop_lines(),
            [
                "systemctl --user stop hone.service",
                "systemctl --user daemon-reload"
            ]
        );
        let uid = uid();
        f.manager = ServiceManager::Launchd;
        f.path = f.paths.launchd_plist.clone();
        assert_eq!(
            joined(f.enable_now()),
            [format!(
                "launchctl bootstrap gui/{uid} /home/ada/Library/LaunchAgents/dev.hone.daemon.plist"
            )]
        );
        assert_eq!(
            f.disable_now().join(" "),
            format!("launchctl bootout gui/{uid}/dev.hone.daemon")
        );
        assert!(f.forget_now().is_empty());
        assert_eq!(
            f.stop_lines(),
            [format!("launchctl bootout gui/{uid}/dev.hone.daemon")]
        );
    }

    #[test]
    fn a_command_that_cannot_run_or_fails_says_what_to_do() {
        let e = run_command(&args(&["/nonexistent/hone-no-such-tool"])).unwrap_err();
        assert!(
            format!("{e:#}").contains("Run the commands yourself"),
            "{e:#}"
        );
        let e = run_command(&args(&["false"])).unwrap_err();
        assert!(e.to_string().contains("`false` failed"), "{e}");
        run_command(&args(&["true"])).unwrap();
        assert!(run_command(&[]).is_err());
    }
}
