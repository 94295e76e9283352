//! The store contract, run against every implementation (SQLite today; PostgreSQL must pass the
//! same), plus what a full disk does to the API.
mod common;

use std::sync::Arc;

use iotunnel::seam::{CloseReason, ConnectionEvent, ConnectionEventKind, Side};
use iotunnel::store::sqlite::SqliteStore;
use iotunnel::store::*;

fn new_tunnel(id: &str, device: &str, at: i64) -> NewTunnel {
    NewTunnel {
        id: id.into(),
        account_id: "acc_a".into(),
        product_key: "pk".into(),
        device_name: device.into(),
        custom_info: Some("ci".into()),
        description: None,
        services: vec!["SSH".into(), "RDP".into()],
        created_at: at,
        expires_at: at + 1000,
        client_token_hash: [1; 32],
        device_token_hash: [2; 32],
        device_token_seed: [3; 32],
        max_open_per_device: 3,
    }
}

async fn seed(s: &dyn Store) {
    s.create_account("acc_a".into(), "a".into(), false, [9; 32], 1)
        .await
        .unwrap();
    s.create_account("acc_b".into(), "b".into(), false, [8; 32], 1)
        .await
        .unwrap();
    for (pk, acc) in [("pk", "acc_a"), ("pk_b", "acc_b")] {
        let p = Product {
            product_key: pk.into(),
            account_id: acc.into(),
            name: "p".into(),
            created_at: 1,
        };
        s.create_product(p).await.unwrap();
    }
    for name in ["d1", "d2"] {
        let d = Device {
            product_key: "pk".into(),
            account_id: "acc_a".into(),
            name: name.into(),
            secret: "s".into(),
            created_at: 1,
        };
        s.create_device(d).await.unwrap();
    }
}

/// The contract every [`Store`] must meet.
async fn contract(s: Arc<dyn Store>) {
    let s = s.as_ref();
    seed(s).await;
    assert_eq!(
        s.account_by_key([9; 32]).await.unwrap().unwrap().id,
        "acc_a"
    );
    assert!(s.account_by_key([7; 32]).await.unwrap().is_none());
    s.add_api_key("acc_a".into(), [6; 32], 2).await.unwrap();
    s.add_api_key("acc_a".into(), [6; 32], 2).await.unwrap();
    assert_eq!(
        s.account_by_key([6; 32]).await.unwrap().unwrap().id,
        "acc_a"
    );
    assert!(s.admin_account().await.unwrap().is_none());
    assert_eq!(
        s.create_account("acc_a".into(), "x".into(), false, [5; 32], 1)
            .await,
        Err(StoreError::AlreadyExists)
    );

    // Ownership: another account's product is not found.
    let foreign = Device {
        product_key: "pk".into(),
        account_id: "acc_b".into(),
        name: "x".into(),
        secret: "s".into(),
        created_at: 1,
    };
    assert_eq!(s.create_device(foreign).await, Err(StoreError::NotFound));
    assert_eq!(
        s.list_devices("acc_b".into(), "pk".into()).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        s.list_devices("acc_a".into(), "pk".into())
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        s.get_device("pk".into(), "d1".into())
            .await
            .unwrap()
            .unwrap()
            .account_id,
        "acc_a"
    );

    // Create within the per-device limit.
    for i in 0..3 {
        let t = s
            .create_tunnel(new_tunnel(&format!("t{i}"), "d1", 10 + i))
            .await
            .unwrap();
        assert_eq!((t.state, t.services.len()), (TunnelState::Open, 2));
    }
    assert_eq!(
        s.create_tunnel(new_tunnel("t3", "d1", 20)).await,
        Err(StoreError::TunnelLimit(3))
    );
    assert_eq!(
        s.create_tunnel(new_tunnel("t0", "d2", 20)).await,
        Err(StoreError::AlreadyExists)
    );
    assert_eq!(
        s.create_tunnel(new_tunnel("tx", "ghost", 20)).await,
        Err(StoreError::NotFound)
    );
    let mut other = new_tunnel("ty", "d2", 20);
    other.account_id = "acc_b".into();
    assert_eq!(s.create_tunnel(other).await, Err(StoreError::NotFound));
    s.create_tunnel(new_tunnel("t4", "d2", 30)).await.unwrap();

    // State machine.
    assert_eq!(
        s.delete_tunnel("acc_a".into(), "t0".into()).await,
        Err(StoreError::TunnelNotClosed)
    );
    let closed = s
        .close_tunnel("acc_a".into(), "t0".into(), CloseReason::Closed, 50)
        .await
        .unwrap();
    assert_eq!(
        (
            closed.state,
            closed.closed_at,
            closed.close_reason.as_deref()
        ),
        (TunnelState::Closed, Some(50), Some("closed"))
    );
    assert_eq!(
        s.close_tunnel("acc_a".into(), "t0".into(), CloseReason::Closed, 51)
            .await,
        Err(StoreError::TunnelNotOpen)
    );
    assert_eq!(
        s.close_tunnel("acc_b".into(), "t1".into(), CloseReason::Closed, 51)
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        s.get_tunnel("acc_b".into(), "t1".into()).await,
        Err(StoreError::NotFound)
    );

    // Search: newest first, filters, pages.
    let page = s
        .search_tunnels("acc_a".into(), TunnelFilter::default(), None, 2)
        .await
        .unwrap();
    let ids: Vec<_> = page.tunnels.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["t4", "t2"]);
    let rest = s
        .search_tunnels(
            "acc_a".into(),
            TunnelFilter::default(),
            page.next_before_seq,
            10,
        )
        .await
        .unwrap();
    let ids: Vec<_> = rest.tunnels.iter().map(|t| t.id.as_str()).collect();
    assert_eq!((ids, rest.next_before_seq), (vec!["t1", "t0"], None));
    let f = TunnelFilter {
        state: Some(TunnelState::Closed),
        ..Default::default()
    };
    assert_eq!(
        s.search_tunnels("acc_a".into(), f, None, 10)
            .await
            .unwrap()
            .tunnels
            .len(),
        1
    );
    let f = TunnelFilter {
        device_name: Some("d2".into()),
        product_key: Some("pk".into()),
        ..Default::default()
    };
    assert_eq!(
        s.search_tunnels("acc_a".into(), f, None, 10)
            .await
            .unwrap()
            .tunnels[0]
            .id,
        "t4"
    );
    assert!(s
        .search_tunnels("acc_b".into(), TunnelFilter::default(), None, 10)
        .await
        .unwrap()
        .tunnels
        .is_empty());

    // Rotate.
    let r = Rotation {
        client_token_hash: Some([4; 32]),
        device_token: Some(([5; 32], [6; 32])),
    };
    let t = s
        .rotate_tokens("acc_a".into(), "t1".into(), r)
        .await
        .unwrap();
    assert_eq!(
        (
            t.client_token_hash,
            t.device_token_hash,
            t.device_token_seed
        ),
        ([4; 32], [5; 32], [6; 32])
    );
    assert_eq!(
        s.rotate_tokens("acc_a".into(), "t0".into(), Rotation::default())
            .await,
        Err(StoreError::TunnelNotOpen)
    );

    // Connection events, then a restart's reset.
    let ev = |side, kind| ConnectionEvent {
        tunnel_id: "t1".into(),
        side,
        at: 60,
        kind,
    };
    s.apply_connection_events(vec![
        ev(
            Side::Client,
            ConnectionEventKind::Connected {
                addr: "1.2.3.4:5".into(),
            },
        ),
        ev(
            Side::Client,
            ConnectionEventKind::Rtt {
                last_us: 10,
                smoothed_us: 9,
            },
        ),
        ev(
            Side::Device,
            ConnectionEventKind::Connected {
                addr: "5.6.7.8:9".into(),
            },
        ),
        ev(
            Side::Device,
            ConnectionEventKind::Traffic {
                sent: 123,
                received: 456,
            },
        ),
        ev(
            Side::Device,
            ConnectionEventKind::Disconnected {
                reason: "peer_gone".into(),
            },
        ),
    ])
    .await
    .unwrap();
    let t = s.get_tunnel("acc_a".into(), "t1".into()).await.unwrap();
    assert_eq!(
        (t.client.connected, t.client.rtt_us, t.client.srtt_us),
        (true, Some(10), Some(9))
    );
    assert_eq!((t.device.connected, t.device.updated_at), (false, Some(60)));
    assert_eq!((t.device.bytes_sent, t.device.bytes_received), (123, 456));
    s.reset_connections(70).await.unwrap();
    let t = s.get_tunnel("acc_a".into(), "t1".into()).await.unwrap();
    assert_eq!((t.client.connected, t.client.updated_at), (false, Some(70)));

    // Replay and index sources.
    let open: Vec<_> = s
        .open_tunnels_of_device("pk".into(), "d1".into())
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(open, ["t1", "t2"]);
    assert_eq!(s.all_open_tunnels().await.unwrap().len(), 3);

    // Lifecycle.
    let expired: Vec<_> = s
        .expire_tunnels(1011)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(expired, ["t1"]);
    let t = s.get_tunnel("acc_a".into(), "t1".into()).await.unwrap();
    assert_eq!(t.close_reason.as_deref(), Some("expired"));
    let closed = s
        .delete_device("acc_a".into(), "pk".into(), "d1".into(), 1100)
        .await
        .unwrap();
    assert_eq!(
        closed.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["t2"]
    );
    assert_eq!(closed[0].close_reason.as_deref(), Some("device_deleted"));
    assert_eq!(
        s.delete_device("acc_a".into(), "pk".into(), "d1".into(), 1100)
            .await,
        Err(StoreError::NotFound)
    );
    let mut purged = s.purge_tunnels(12).await.unwrap();
    purged.sort();
    assert_eq!(purged, ["t0", "t1", "t2"]);
    s.delete_tunnel("acc_a".into(), "t4".into())
        .await
        .unwrap_err();
}

#[tokio::test]
async fn sqlite_meets_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap())).await;
}

#[tokio::test]
async fn concurrent_writes_share_commits_and_a_failing_one_spoils_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    seed(store.as_ref()).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = new_tunnel(
                &format!("c{}", i / 2),
                if i % 4 < 2 { "d1" } else { "d2" },
                i,
            );
            t.max_open_per_device = 1000;
            s.create_tunnel(t).await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e, StoreError::AlreadyExists),
        }
    }
    assert_eq!(ok, 150, "every id succeeds exactly once");
    drop(store);
    let reopened = SqliteStore::open(&path).unwrap();
    assert_eq!(
        reopened.all_open_tunnels().await.unwrap().len(),
        150,
        "all answered writes are on disk"
    );
}

#[tokio::test]
async fn migrations_refuse_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(err.contains("newer than this binary"), "{err}");
}

/// A full disk: creates fail with 503 and change nothing; answered creates survive; once space
/// is back, creates work again. Uses a 4 MiB tmpfs mounted for the test (needs root, as CI is).
#[tokio::test]
async fn full_disk_refuses_cleanly_and_loses_nothing() {
    use common::*;
    use serde_json::json;
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount runs");
    assert!(
        status.success(),
        "mounting a tmpfs needs root (CI runs as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let data = Arc::new(tempfile::tempdir_in(&mnt).unwrap());
    let t = TestServer::start_in(
        data.clone(),
        iotunnel::clock::ManualClock::new(iotunnel::clock::Clock::now_ms(
            &iotunnel::clock::SystemClock,
        )),
        |s| s.max_open_tunnels_per_device = 100_000,
    )
    .await;
    let f = t.online_device().await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(
            t.tunnel(&f, json!({})).await["tunnel_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Fill the disk.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
    }
    let body = json!({"product_key": f.product_key, "device_name": f.device_name, "description": "x".repeat(1024)});
    let mut refused = 0;
    for _ in 0..200 {
        let (s, v) = t.post("/v1/tunnels", &f.key, body.clone()).await;
        match s.as_u16() {
            201 => created.push(v["tunnel_id"].as_str().unwrap().to_string()),
            503 => {
                assert_eq!(v["error"]["code"], "store_unavailable");
                refused += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
        if refused >= 3 {
            break;
        }
    }
    assert!(refused >= 3, "a full disk must refuse creates");
    std::fs::remove_file(&filler).unwrap();
    let (s, v) = t.post("/v1/tunnels", &f.key, body).await;
    assert_eq!(s.as_u16(), 201, "space is back: {v}");
    for id in &created {
        let (s, d) = t.get(&format!("/v1/tunnels/{id}"), &f.key).await;
        assert_eq!(
            (s.as_u16(), d["state"].as_str()),
            (200, Some("OPEN")),
            "{id} was answered 201"
        );
    }
}
