//! The Redis harness itself (tests/src/redis.rs): real redis-server processes on free ports,
//! killed, stopped, restarted and clustered by the test.

use std::net::{Ipv4Addr, TcpStream};

use tests::redis::{RedisCluster, RedisOptions, RedisServer, require_redis};

fn refuses_connections(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err()
}

/// A server answers commands on its port, and after `kill` it is gone.
#[test]
fn server_answers_and_is_gone_once_killed() {
    if !require_redis() {
        return;
    }
    let mut redis = RedisServer::start();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    assert!(redis.is_running());
    assert_eq!(redis.command(&["DBSIZE"]), "0");
    assert_eq!(redis.command(&["SET", "otp:key", "a value"]), "OK");
    assert_eq!(redis.command(&["GET", "otp:key"]), "a value");
    assert_eq!(redis.command(&["GET", "missing"]), "(nil)");
    assert_eq!(redis.command(&["DBSIZE"]), "1");
    assert_eq!(
        redis.command(&["CONFIG", "GET", "appendonly"]),
        "appendonly\nno"
    );
    assert!(
        redis
            .command(&["NO-SUCH-COMMAND"])
            .starts_with("(error) ERR unknown command"),
    );
    let pid = redis.pid().expect("a running server has a pid");
    assert!(
        redis
            .command(&["INFO", "server"])
            .contains(&format!("process_id:{pid}")),
        "the server answering is the one the harness spawned"
    );

    redis.kill();
    assert!(!redis.is_running());
    assert_eq!(redis.pid(), None);
    assert!(refuses_connections(redis.port()));
    assert!(redis.try_command(&["PING"]).is_err());
}

/// With the AOF on, a key written before a graceful stop is there after the restart.
#[test]
fn aof_keeps_keys_across_stop_and_restart() {
    if !require_redis() {
        return;
    }
    let mut redis = RedisServer::start_with(RedisOptions { appendonly: true });
    let port = redis.port();
    assert_eq!(
        redis.command(&["CONFIG", "GET", "appendfsync"]),
        "appendfsync\nalways"
    );
    assert_eq!(redis.command(&["SET", "kept", "across restarts"]), "OK");
    redis.stop();
    assert!(!redis.is_running());
    assert!(refuses_connections(port));

    redis.restart();
    assert!(redis.is_running());
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["GET", "kept"]), "across restarts");

    // A crash loses nothing either: every write was fsynced before it was answered.
    assert_eq!(redis.command(&["SET", "after", "crash"]), "OK");
    redis.kill();
    redis.restart();
    assert_eq!(redis.command(&["GET", "after"]), "crash");
    assert_eq!(redis.command(&["DBSIZE"]), "2");
}

/// Without the AOF a restart starts empty: what the AOF test sees is the AOF's doing.
#[test]
fn without_aof_a_restart_starts_empty() {
    if !require_redis() {
        return;
    }
    let mut redis = RedisServer::start();
    assert_eq!(redis.command(&["SET", "lost", "on restart"]), "OK");
    redis.restart();
    assert_eq!(redis.command(&["GET", "lost"]), "(nil)");
    assert_eq!(redis.command(&["DBSIZE"]), "0");
}

/// Two servers get their own ports and data; dropping one kills it and removes its directory.
#[test]
fn servers_are_separate_and_cleaned_up_on_drop() {
    if !require_redis() {
        return;
    }
    let one = RedisServer::start();
    let two = RedisServer::start();
    assert_ne!(one.port(), two.port());
    assert_ne!(one.dir(), two.dir());
    assert_eq!(one.command(&["SET", "only", "in one"]), "OK");
    assert_eq!(two.command(&["GET", "only"]), "(nil)");

    let (port, dir) = (one.port(), one.dir().to_owned());
    assert!(dir.is_dir());
    drop(one);
    assert!(refuses_connections(port));
    assert!(!dir.exists(), "{dir:?} is removed on drop");
    assert_eq!(two.command(&["PING"]), "PONG");
}

/// Three masters form a cluster that every node sees as ok, with all slots assigned.
#[test]
fn cluster_of_three_is_ok() {
    if !require_redis() {
        return;
    }
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    for (node, url) in cluster.nodes().iter().zip(&urls) {
        assert_eq!(url, &node.url());
        let info = node.command(&["CLUSTER", "INFO"]);
        for line in [
            "cluster_state:ok",
            "cluster_known_nodes:3",
            "cluster_size:3",
            "cluster_slots_assigned:16384",
        ] {
            assert!(
                info.lines().any(|l| l.trim() == line),
                "node {url} lacks {line}:\n{info}"
            );
        }
    }
    // Keys live on the node that owns their slot; the others redirect.
    let answers: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|node| node.command(&["SET", "otp:slot", "v"]))
        .collect();
    assert_eq!(
        answers.iter().filter(|a| *a == "OK").count(),
        1,
        "{answers:?}"
    );
    assert_eq!(
        answers
            .iter()
            .filter(|a| a.starts_with("(error) MOVED "))
            .count(),
        2,
        "{answers:?}"
    );
}
