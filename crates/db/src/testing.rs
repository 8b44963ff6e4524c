//! A real PostgreSQL server for tests: Debian's `postgresql` package, started on loopback
//! in a temporary data directory (as the `postgres` user the package creates when the
//! tests run as root: PostgreSQL refuses to run as root), stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running PostgreSQL server.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The directory of PostgreSQL's server programs (`initdb`, `pg_ctl`): `$PG_BIN`, else
/// the newest `/usr/lib/postgresql/N/bin`.
fn pg_bin() -> Result<PathBuf, String> {
    if let Some(b) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(b));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("PostgreSQL is not installed (apt-get install postgresql): {e}"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no /usr/lib/postgresql/N/bin/initdb: apt-get install postgresql".into())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl Postgres {
    /// Creates a cluster (superuser `capy`, trust authentication on loopback only) and
    /// starts it on a free port.
    ///
    /// # Errors
    /// PostgreSQL missing, or a step that failed, with its output.
    pub fn start() -> Result<Postgres, String> {
        let bin = pg_bin()?;
        let as_postgres = is_root();
        // /tmp when the server runs as `postgres`: it must reach its directory
        let tmp = if as_postgres {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let base = tmp.join(format!("capy-pg-{}-{}", std::process::id(), free_port()?));
        std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
        if as_postgres {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&base)
                .status()
                .map_err(|e| e.to_string())?
                .success();
            if !ok {
                return Err("chown postgres failed (is there a postgres user?)".into());
            }
        }
        let port = free_port()?;
        let pg = Postgres {
            dir: base,
            bin,
            port,
            as_postgres,
        };
        let data = pg.dir.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-A",
                "trust",
                "-U",
                "capy",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        pg.restart()?;
        Ok(pg)
    }

    fn run(&self, prog: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(prog);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .current_dir(&self.dir)
                .output()
        } else {
            Command::new(&exe)
                .args(args)
                .current_dir(&self.dir)
                .output()
        }
        .map_err(|e| format!("{}: {e}", exe.display()))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            return Err(format!(
                "{prog} failed: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// A URL for a new, empty database `name` on this server (created now).
    ///
    /// # Errors
    /// `createdb`'s.
    pub fn database(&self, name: &str) -> Result<String, String> {
        let port = self.port.to_string();
        self.run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "capy", name],
        )?;
        Ok(self.url(name))
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://capy@127.0.0.1:{}/{name}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server at once (for tests of a database that goes away).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let _ = self.run(
            "pg_ctl",
            &["-D", path(&data), "-m", "immediate", "-w", "stop"],
        );
    }

    /// Starts a stopped server again on the same port.
    ///
    /// # Errors
    /// `pg_ctl`'s.
    pub fn restart(&self) -> Result<(), String> {
        let data = self.dir.join("data");
        let opts = format!(
            "-h 127.0.0.1 -p {} -k {} -F -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&data),
                "-o",
                &opts,
                "-l",
                path(&log),
                "-w",
                "start",
            ],
        )
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
