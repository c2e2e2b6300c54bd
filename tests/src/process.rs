//! The `otpgate` binary as a separate process: for the tests where an instance must really die
//! (`kill -9`) or several instances must be separate processes.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::Gateway;

/// Whether the child in `slot` still runs; one that has exited is reaped and the slot emptied.
pub fn still_running(slot: &mut Option<Child>) -> bool {
    let Some(child) = slot.as_mut() else {
        return false;
    };
    match child.try_wait() {
        Ok(None) => true,
        Ok(Some(_)) | Err(_) => {
            *slot = None;
            false
        }
    }
}

/// Kills the child in `slot` with SIGKILL and waits for it; nothing if the slot is empty.
pub fn kill_and_reap(slot: &mut Option<Child>) {
    if let Some(mut child) = slot.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// An `otpgate` process with its own config file and logs, killed when dropped.
#[derive(Debug)]
pub struct OtpgateProcess {
    child: Child,
    dir: PathBuf,
    /// A handle on its API and admin listeners, for the harness's request helpers.
    pub gateway: Gateway,
}

impl OtpgateProcess {
    /// Starts `otpgate --config` with `config_toml` (without `listen` or `admin_listen`: free
    /// loopback ports are added) and waits until `/readyz` answers 200.
    pub async fn start(config_toml: &str) -> OtpgateProcess {
        let api = free_addr();
        let admin = free_addr();
        let dir = std::env::temp_dir().join(format!(
            "otpgate-process-{}-{}",
            std::process::id(),
            api.port()
        ));
        std::fs::create_dir_all(&dir).expect("process dir");
        let config = dir.join("otpgate.toml");
        std::fs::write(
            &config,
            format!("listen = \"{api}\"\nadmin_listen = \"{admin}\"\n{config_toml}"),
        )
        .expect("config file");
        let log = std::fs::File::create(dir.join("otpgate.log")).expect("log file");
        let mut command = Command::new(otpgate_binary());
        for (name, _) in std::env::vars() {
            if name.starts_with("OTPGATE_") {
                command.env_remove(name);
            }
        }
        let child = command
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start otpgate");
        let gateway = Gateway::external(api, admin);
        let mut process = OtpgateProcess {
            child,
            dir,
            gateway,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = reqwest::get(format!("http://{admin}/readyz"))
                .await
                .is_ok_and(|response| response.status() == 200);
            if ready {
                return process;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("otpgate exited with {status}: {}", process.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "otpgate did not become ready: {}",
                process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no shutdown, nothing flushed, nothing acknowledged.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it logged on standard error.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("otpgate.log")).unwrap_or_default()
    }
}

impl Drop for OtpgateProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}

/// The `otpgate` binary of this build: `cargo test --workspace` builds it next to the test
/// binaries; otherwise it is built now.
pub fn otpgate_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/tests-… → target/<profile>/otpgate
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("otpgate"))
        .expect("target dir");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "-p", "gateway", "--bin", "otpgate"])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building otpgate failed");
    }
    binary
}
