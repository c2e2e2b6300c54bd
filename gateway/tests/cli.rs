//! The `otpgate` binary itself: config checking, the refusal to run unauthenticated on a public
//! address, the quick start on embedded defaults, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

fn otpgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_otpgate"));
    // The tests set everything they need; the environment must not leak in.
    for (name, _) in std::env::vars() {
        if name.starts_with("OTPGATE_") {
            command.env_remove(name);
        }
    }
    command
}

fn example_config() -> String {
    format!("{}/../otpgate.example.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let output = otpgate()
        .args(["--check-config", "--config", &example_config()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("config ok:"), "{stdout}");
}

/// Runs `--check-config` on a file holding `text`; returns the exit code and standard error.
fn check_config(path: &std::path::Path, text: &str) -> (Option<i32>, String) {
    std::fs::write(path, text).unwrap();
    let output = otpgate()
        .args(["--check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_config_names_the_bad_key_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("otpgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    let (code, stderr) = check_config(&path, "[verification]\ncode_ttl_secs = 1\n");
    assert_eq!(code, Some(2));
    assert!(stderr.contains("verification.code_ttl_secs"), "{stderr}");

    let (code, stderr) = check_config(&path, "listen = \"127.0.0.1:1\"\nlisten_typo = 1\n");
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("listen_typo") && stderr.contains("bad.toml"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// With no API keys configured, a listener off loopback is refused before anything binds.
#[test]
fn refuses_to_run_unauthenticated_on_a_public_address() {
    let output = otpgate()
        .args(["--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no clients (API keys) are configured"),
        "{stderr}"
    );

    let output = otpgate()
        .env("OTPGATE_ADMIN_LISTEN", "0.0.0.0:0")
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(2),
        "the admin listener counts too"
    );
}

/// The quick start: embedded defaults and the console carrier. The code shows on standard
/// output (the console carrier's own output) and never in the logs, even at trace level; the
/// process exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_runs_and_exits_cleanly_on_sigterm() {
    let mut child = tokio::task::spawn_blocking(|| {
        otpgate()
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (api_tx, api_rx) = std::sync::mpsc::channel();
    let stderr_reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("otpgate listening") {
                let api = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("api="))
                    .map(str::to_owned);
                let _ = api_tx.send(api);
                sent = true;
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let api = api_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the gateway logs its address")
        .expect("the address is in the line");

    let client = reqwest::Client::new();
    let started: serde_json::Value = client
        .post(format!("http://{api}/v1/verifications"))
        .body(r#"{"phone": "+393391234567"}"#)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|text| serde_json::from_str(&text).unwrap())
        .unwrap();
    let id = started["id"].as_str().unwrap().to_owned();

    let (line_tx, line_rx) = std::sync::mpsc::channel();
    let stdout_reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let sms_line = line_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the console carrier prints the SMS");
    assert!(sms_line.contains("+39339****567"), "{sms_line}");
    let code: String = sms_line
        .split(|c: char| !c.is_ascii_digit())
        .find(|run| run.len() == 6)
        .expect("a six-digit code")
        .to_owned();
    let answer: serde_json::Value = client
        .post(format!("http://{api}/v1/verifications/{id}/check"))
        .body(format!(r#"{{"code": "{code}"}}"#))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|text| serde_json::from_str(&text).unwrap())
        .unwrap();
    assert_eq!(answer["valid"], true, "{answer}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let logs = stderr_reader.join().unwrap();
    stdout_reader.join().unwrap();
    assert!(
        logs.contains("SIGTERM received") && logs.contains("otpgate stopped"),
        "{logs}"
    );
    assert!(
        logs.contains("NO API KEYS CONFIGURED"),
        "the unauthenticated mode is announced loudly"
    );
    assert!(!logs.contains(&code), "the code appears in the logs");
    assert!(
        !logs.contains("3391234567"),
        "the full phone number appears in the logs"
    );
}

/// `--help` documents the environment variables.
#[test]
fn help_lists_flags_with_their_variables() {
    let output = otpgate().arg("--help").output().unwrap();
    let mut help = String::new();
    output.stdout.as_slice().read_to_string(&mut help).unwrap();
    for needle in [
        "--config",
        "OTPGATE_LISTEN",
        "--check-config",
        "OTPGATE_SHUTDOWN_GRACE_SECS",
    ] {
        assert!(help.contains(needle), "missing {needle} in:\n{help}");
    }
}

/// Even at `RUST_LOG=trace`, with a directive naming the codec's own target, an SMPP bind's password never reaches the logs: the SMPP codec logs
/// every PDU it encodes at debug level (the bind with its password: the tests' log capture saw
/// it before it was silenced), and the binary silences it (`SILENCED_LOG_TARGETS`).
#[test]
fn smpp_passwords_stay_out_of_trace_logs() {
    let smsc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = std::env::temp_dir().join(format!("otpgate-cli-smpp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("smpp.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[[carriers]]\n\
             name = \"smsc\"\nkind = \"smpp\"\nhost = \"127.0.0.1\"\nport = {}\n\
             system_id = \"otpgate\"\npassword = \"pw5ecret\"\n",
            smsc.local_addr().unwrap().port()
        ),
    )
    .unwrap();
    let mut child = otpgate()
        .args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "trace,rusmpp::codec::encode=trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The bind arrives, password and all, on the wire: it was encoded, and would have been logged.
    let (mut stream, _) = smsc.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bind = Vec::new();
    let mut buffer = [0u8; 256];
    while !bind.windows(8).any(|window| window == b"pw5ecret") {
        let n = stream.read(&mut buffer).expect("the bind arrives");
        assert!(n > 0, "the connection closed before the bind");
        bind.extend_from_slice(&buffer[..n]);
    }
    // A moment for any log line about it to be written.
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(logs.contains("otpgate listening"), "{logs}");
    assert!(
        !logs.contains("pw5ecret"),
        "the password was logged:\n{logs}"
    );
}
