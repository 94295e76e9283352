//! The store contract, run against every implementation (SQLite today; PostgreSQL must pass the
//! same), plus what a full disk does to the API.
mod common;

use std::sync::Arc;

use common::pg::TestDatabase;
use iotunnel::seam::{CloseReason, ConnectionEvent, ConnectionEventKind, Side};
use iotunnel::store::postgres::PgStore;
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
        owner_node: None,
    }
}

fn key(id: &str, account: &str, hash: u8, origin: KeyOrigin, at: i64) -> NewApiKey {
    NewApiKey {
        id: id.into(),
        account_id: account.into(),
        name: format!("{id} label"),
        origin,
        key_hash: [hash; 32],
        created_at: at,
    }
}

fn key_ids(keys: &[ApiKey]) -> Vec<&str> {
    keys.iter().map(|k| k.id.as_str()).collect()
}

async fn seed(s: &dyn Store) {
    let ka = key("key_a", "acc_a", 9, KeyOrigin::Account, 1);
    s.create_account("acc_a".into(), "a".into(), false, ka)
        .await
        .unwrap();
    let kb = key("key_b", "acc_b", 8, KeyOrigin::Account, 1);
    s.create_account("acc_b".into(), "b".into(), false, kb)
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
            open_tunnels: 0,
        };
        s.create_device(d).await.unwrap();
    }
}

/// API keys: authentication, listing per account, last use, revoke and retirement (runs right
/// after `seed`: acc_a holds key_a (hash 9), acc_b key_b (hash 8)).
async fn api_key_contract(s: &dyn Store) {
    let (a, k) = s.account_by_key([9; 32]).await.unwrap().unwrap();
    assert_eq!((a.id.as_str(), k.id.as_str()), ("acc_a", "key_a"));
    assert_eq!(
        (k.origin, k.name.as_str()),
        (KeyOrigin::Account, "key_a label")
    );
    assert_eq!(
        (k.key_hash, k.last_used_at, k.revoked_at),
        ([9; 32], None, None)
    );
    assert!(s.account_by_key([7; 32]).await.unwrap().is_none());

    // Adding a stored hash again changes nothing (even for another account) and returns it.
    let k6 = s
        .add_api_key(key("key_6", "acc_a", 6, KeyOrigin::Env, 2))
        .await
        .unwrap();
    assert_eq!(
        (k6.id.as_str(), k6.origin, k6.created_at),
        ("key_6", KeyOrigin::Env, 2)
    );
    let again = s
        .add_api_key(key("key_x", "acc_b", 6, KeyOrigin::Api, 3))
        .await;
    assert_eq!(again.unwrap(), k6);
    let ghost = s
        .add_api_key(key("key_g", "acc_ghost", 5, KeyOrigin::Api, 3))
        .await;
    assert_eq!(ghost, Err(StoreError::NotFound));
    let dup = key("key_z", "acc_a", 5, KeyOrigin::Account, 1);
    assert_eq!(
        s.create_account("acc_a".into(), "x".into(), false, dup)
            .await,
        Err(StoreError::AlreadyExists)
    );
    // A stored hash cannot found a second account, and nothing of the attempt stays.
    let reused = key("key_c", "acc_c", 9, KeyOrigin::Account, 1);
    assert_eq!(
        s.create_account("acc_c".into(), "c".into(), false, reused)
            .await,
        Err(StoreError::AlreadyExists)
    );
    assert!(s
        .list_api_keys(Some("acc_c".into()))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.add_api_key(key("key_c2", "acc_c", 4, KeyOrigin::Api, 1))
            .await,
        Err(StoreError::NotFound),
        "the account was rolled back"
    );

    // Lists: an account's own keys, oldest first; `None` lists every account's.
    let mine = s.list_api_keys(Some("acc_a".into())).await.unwrap();
    assert_eq!(key_ids(&mine), ["key_a", "key_6"]);
    let all = s.list_api_keys(None).await.unwrap();
    let mut all = key_ids(&all);
    all.sort();
    assert_eq!(all, ["key_6", "key_a", "key_b"]);

    // Last use only moves forward.
    s.touch_api_key("key_6".into(), 50).await.unwrap();
    s.touch_api_key("key_6".into(), 40).await.unwrap();
    let (_, k) = s.account_by_key([6; 32]).await.unwrap().unwrap();
    assert_eq!(k.last_used_at, Some(50));

    // Revoke: only within the account (or any, with no account); at once, and for good.
    let theirs = s
        .revoke_api_key(Some("acc_b".into()), "key_6".into(), 60)
        .await;
    assert_eq!(theirs, Err(StoreError::NotFound));
    let revoked = s
        .revoke_api_key(Some("acc_a".into()), "key_6".into(), 60)
        .await
        .unwrap();
    assert_eq!(
        (revoked.id.as_str(), revoked.revoked_at),
        ("key_6", Some(60))
    );
    assert!(s.account_by_key([6; 32]).await.unwrap().is_none());
    let mine = s.list_api_keys(Some("acc_a".into())).await.unwrap();
    assert_eq!(key_ids(&mine), ["key_a"]);
    let twice = s.revoke_api_key(None, "key_6".into(), 61).await;
    assert_eq!(twice, Err(StoreError::NotFound));
    let back = s
        .add_api_key(key("key_w", "acc_a", 6, KeyOrigin::Env, 70))
        .await
        .unwrap();
    assert_eq!(
        (back.id.as_str(), back.revoked_at),
        ("key_6", Some(60)),
        "no resurrection"
    );
    assert!(s.account_by_key([6; 32]).await.unwrap().is_none());

    // Retirement: the account's keys of one origin, except the one kept.
    for (id, hash, at) in [("key_e1", 11, 80), ("key_e2", 12, 81), ("key_e3", 13, 82)] {
        s.add_api_key(key(id, "acc_b", hash, KeyOrigin::Env, at))
            .await
            .unwrap();
    }
    let retired = s
        .retire_api_keys("acc_b".into(), KeyOrigin::Env, "key_e3".into(), 90)
        .await
        .unwrap();
    let mut retired: Vec<_> = retired
        .iter()
        .map(|k| (k.id.as_str(), k.revoked_at))
        .collect();
    retired.sort();
    assert_eq!(retired, [("key_e1", Some(90)), ("key_e2", Some(90))]);
    let theirs = s.list_api_keys(Some("acc_b".into())).await.unwrap();
    assert_eq!(key_ids(&theirs), ["key_b", "key_e3"]);
    s.revoke_api_key(None, "key_e3".into(), 95).await.unwrap();
    assert!(s.account_by_key([13; 32]).await.unwrap().is_none());
    assert!(s.account_by_key([8; 32]).await.unwrap().is_some());
}

/// The contract every [`Store`] must meet.
async fn contract(s: Arc<dyn Store>) {
    let s = s.as_ref();
    seed(s).await;
    api_key_contract(s).await;
    assert!(s.admin_account().await.unwrap().is_none());

    // Ownership: another account's product is not found.
    let foreign = Device {
        product_key: "pk".into(),
        account_id: "acc_b".into(),
        name: "x".into(),
        secret: "s".into(),
        created_at: 1,
        open_tunnels: 0,
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
    let devices = s.list_devices("acc_a".into(), "pk".into()).await.unwrap();
    let open: Vec<_> = devices
        .iter()
        .map(|d| (d.name.as_str(), d.open_tunnels))
        .collect();
    assert_eq!(open, [("d1", 3), ("d2", 0)]);
    let d1 = s.get_device("pk".into(), "d1".into()).await.unwrap();
    assert_eq!(d1.unwrap().open_tunnels, 3);
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
    // An event older than the side's last change is stale and ignored (a node that lost the
    // tunnel reporting its peer's end after the new owner reported the new connection).
    let stale = ConnectionEvent {
        at: 59,
        ..ev(
            Side::Client,
            ConnectionEventKind::Disconnected {
                reason: "moved".into(),
            },
        )
    };
    s.apply_connection_events(vec![stale]).await.unwrap();
    let t = s.get_tunnel("acc_a".into(), "t1".into()).await.unwrap();
    assert_eq!((t.client.connected, t.client.updated_at), (true, Some(60)));
    s.reset_connections("n1".into(), 70).await.unwrap();
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

    fleet_contract(s).await;
    vendor_contract(s).await;
}

/// Access keys, tunnel tags and the device tunnel switch (the vendor facades, issue 13).
async fn vendor_contract(s: &dyn Store) {
    let key = |id: &str, acc: &str, at: i64| AccessKey {
        id: id.into(),
        account_id: acc.into(),
        sealed_secret: vec![at as u8; 40],
        created_at: at,
    };
    s.create_access_key(key("K2", "acc_a", 20)).await.unwrap();
    s.create_access_key(key("K1", "acc_a", 10)).await.unwrap();
    s.create_access_key(key("KB", "acc_b", 10)).await.unwrap();
    assert_eq!(
        s.create_access_key(key("K1", "acc_b", 30)).await,
        Err(StoreError::AlreadyExists)
    );
    assert_eq!(
        s.create_access_key(key("K9", "acc_nobody", 30)).await,
        Err(StoreError::NotFound)
    );
    let listed = s.list_access_keys("acc_a".into()).await.unwrap();
    assert_eq!(listed, vec![key("K1", "acc_a", 10), key("K2", "acc_a", 20)]);
    let (k, account) = s.access_key("K2".into()).await.unwrap().unwrap();
    assert_eq!((k, account.id.as_str()), (key("K2", "acc_a", 20), "acc_a"));
    assert!(s.access_key("K9".into()).await.unwrap().is_none());
    // Revocation: only by the owning account, and then the key is gone.
    assert_eq!(
        s.delete_access_key("acc_b".into(), "K2".into()).await,
        Err(StoreError::NotFound)
    );
    s.delete_access_key("acc_a".into(), "K2".into())
        .await
        .unwrap();
    assert!(s.access_key("K2".into()).await.unwrap().is_none());
    assert_eq!(
        s.delete_access_key("acc_a".into(), "K2".into()).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(s.list_access_keys("acc_b".into()).await.unwrap().len(), 1);

    // Tags: per tunnel of the account, merged by key, removed by key, gone with the tunnel.
    let tag_tunnel = |at: i64| NewTunnel {
        expires_at: 9_000_000,
        max_open_per_device: 1000,
        ..new_tunnel("tag1", "d2", at)
    };
    s.create_tunnel(tag_tunnel(5000)).await.unwrap();
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(s
        .tunnel_tags("acc_a".into(), "tag1".into())
        .await
        .unwrap()
        .is_empty());
    s.tag_tunnel(
        "acc_a".into(),
        "tag1".into(),
        pairs(&[("b", "1"), ("a", "2")]),
    )
    .await
    .unwrap();
    s.tag_tunnel("acc_a".into(), "tag1".into(), pairs(&[("b", "3")]))
        .await
        .unwrap();
    assert_eq!(
        s.tunnel_tags("acc_a".into(), "tag1".into()).await.unwrap(),
        pairs(&[("a", "2"), ("b", "3")])
    );
    for r in [
        s.tunnel_tags("acc_b".into(), "tag1".into()).await.map(drop),
        s.tag_tunnel("acc_b".into(), "tag1".into(), pairs(&[("x", "")]))
            .await,
        s.untag_tunnel("acc_b".into(), "tag1".into(), vec!["a".into()])
            .await,
        s.tunnel_tags("acc_a".into(), "nope".into()).await.map(drop),
    ] {
        assert_eq!(r, Err(StoreError::NotFound));
    }
    s.untag_tunnel("acc_a".into(), "tag1".into(), vec!["a".into(), "zz".into()])
        .await
        .unwrap();
    assert_eq!(
        s.tunnel_tags("acc_a".into(), "tag1".into()).await.unwrap(),
        pairs(&[("b", "3")])
    );
    s.close_tunnel("acc_a".into(), "tag1".into(), CloseReason::Closed, 5001)
        .await
        .unwrap();
    s.delete_tunnel("acc_a".into(), "tag1".into())
        .await
        .unwrap();
    s.create_tunnel(tag_tunnel(6000)).await.unwrap();
    assert!(
        s.tunnel_tags("acc_a".into(), "tag1".into())
            .await
            .unwrap()
            .is_empty(),
        "a deleted tunnel's tags go with it"
    );

    // The device tunnel switch.
    assert!(!s
        .device_tunnels_disabled("pk".into(), "d2".into())
        .await
        .unwrap());
    assert!(!s
        .device_tunnels_disabled("pk".into(), "nope".into())
        .await
        .unwrap());
    assert_eq!(
        s.set_device_tunnels_disabled("acc_b".into(), "pk".into(), "d2".into(), true)
            .await,
        Err(StoreError::NotFound)
    );
    s.set_device_tunnels_disabled("acc_a".into(), "pk".into(), "d2".into(), true)
        .await
        .unwrap();
    assert!(s
        .device_tunnels_disabled("pk".into(), "d2".into())
        .await
        .unwrap());
    s.set_device_tunnels_disabled("acc_a".into(), "pk".into(), "d2".into(), false)
        .await
        .unwrap();
    assert!(!s
        .device_tunnels_disabled("pk".into(), "d2".into())
        .await
        .unwrap());
}

fn node(id: &str, heartbeat_at: i64) -> NodeRecord {
    NodeRecord {
        node_id: id.into(),
        relay_url: format!("wss://{id}.example:443"),
        api_url: format!("http://{id}.example:8080"),
        mesh_addr: Some(format!("{id}.example:7000")),
        version: "0.1.0".into(),
        started_at: 1,
        heartbeat_at,
        shards: 4,
        open_tunnels: 7,
        device_channels: 9,
        draining: false,
    }
}

fn ids(tunnels: &[Tunnel]) -> Vec<&str> {
    tunnels.iter().map(|t| t.id.as_str()).collect()
}

/// Connects both sides of each tunnel at `at`.
async fn connect_all(s: &dyn Store, tunnel_ids: &[&str], at: i64) {
    let mut events = Vec::new();
    for id in tunnel_ids {
        for side in [Side::Device, Side::Client] {
            events.push(ConnectionEvent {
                tunnel_id: id.to_string(),
                side,
                at,
                kind: ConnectionEventKind::Connected {
                    addr: "1.2.3.4:5".into(),
                },
            });
        }
    }
    s.apply_connection_events(events).await.unwrap();
}

async fn tunnel(s: &dyn Store, id: &str) -> Tunnel {
    s.get_tunnel("acc_a".into(), id.into()).await.unwrap()
}

/// The fleet's part of the contract (runs after the rest: d2 and its OPEN tunnel t4 remain).
async fn fleet_contract(s: &dyn Store) {
    // Nodes: upsert replaces, the list is by node id.
    s.upsert_node(node("n2", 1)).await.unwrap();
    s.upsert_node(node("n1", 1)).await.unwrap();
    let mut n1 = node("n1", 5);
    (n1.draining, n1.mesh_addr, n1.open_tunnels) = (true, None, 0);
    s.upsert_node(n1.clone()).await.unwrap();
    assert_eq!(s.list_nodes().await.unwrap(), vec![n1, node("n2", 1)]);

    // Fleet secrets: the first writer wins.
    let secret = |name: &str, v: &[u8]| s.fleet_secret(name.into(), v.to_vec());
    assert_eq!(secret("mesh", &[1, 2]).await.unwrap(), [1, 2]);
    assert_eq!(secret("mesh", &[3]).await.unwrap(), [1, 2]);
    assert_eq!(secret("token", &[7; 32]).await.unwrap(), [7; 32]);

    // Leases: taken, renewed by the holder, refused to others until expired (until < now).
    let lease = |name: &str, holder: &str, now| s.try_lease(name.into(), holder.into(), now, 50);
    assert!(lease("sweeper", "n1", 100).await.unwrap());
    assert!(!lease("sweeper", "n2", 120).await.unwrap());
    assert!(
        lease("sweeper", "n1", 140).await.unwrap(),
        "renewed until 190"
    );
    assert!(!lease("sweeper", "n2", 160).await.unwrap());
    assert!(
        !lease("sweeper", "n2", 190).await.unwrap(),
        "190 is not past 190"
    );
    assert!(
        lease("sweeper", "n2", 191).await.unwrap(),
        "expired: stolen"
    );
    assert!(!lease("sweeper", "n1", 200).await.unwrap());
    assert!(
        lease("placer", "n1", 200).await.unwrap(),
        "leases are independent"
    );

    // Owners: stored and read back everywhere.
    let owners = [
        ("f1", Some("n1")),
        ("f2", Some("n1")),
        ("f3", Some("n2")),
        ("f4", Some("n1")),
        ("f5", None),
    ];
    for (id, owner) in owners {
        let mut t = new_tunnel(id, "d2", 2000);
        t.max_open_per_device = 100;
        t.owner_node = owner.map(Into::into);
        assert_eq!(
            s.create_tunnel(t).await.unwrap().owner_node.as_deref(),
            owner
        );
    }
    assert_eq!(tunnel(s, "f1").await.owner_node.as_deref(), Some("n1"));
    let open = s
        .open_tunnels_of_device("pk".into(), "d2".into())
        .await
        .unwrap();
    let got: Vec<_> = open
        .iter()
        .map(|t| (t.id.as_str(), t.owner_node.as_deref()))
        .collect();
    assert_eq!(got, [[("t4", None)].as_slice(), &owners].concat());
    let all = s.all_open_tunnels().await.unwrap();
    assert_eq!(all.iter().filter(|t| t.owner_node.is_some()).count(), 4);
    let page = s
        .search_tunnels("acc_a".into(), TunnelFilter::default(), None, 1)
        .await
        .unwrap();
    assert_eq!(page.tunnels[0].owner_node, None, "f5, the newest");
    s.close_tunnel("acc_a".into(), "f2".into(), CloseReason::Closed, 2010)
        .await
        .unwrap();
    let by_owner = |v: &[(&str, u64)]| {
        v.iter()
            .map(|(n, c)| (n.to_string(), *c))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        s.open_tunnels_by_owner().await.unwrap(),
        by_owner(&[("n1", 2), ("n2", 1)]),
        "CLOSED and ownerless tunnels are not counted"
    );

    // A node's restart resets its own tunnels and the ownerless ones, no other node's.
    connect_all(s, &["t4", "f1", "f3", "f4", "f5"], 2100).await;
    s.reset_connections("n2".into(), 2200).await.unwrap();
    for (id, still) in [
        ("t4", false),
        ("f1", true),
        ("f3", false),
        ("f4", true),
        ("f5", false),
    ] {
        let t = tunnel(s, id).await;
        assert_eq!(
            (t.device.connected, t.client.connected),
            (still, still),
            "{id}"
        );
        let at = if still { 2100 } else { 2200 };
        assert_eq!(
            (t.device.updated_at, t.client.updated_at),
            (Some(at), Some(at)),
            "{id}"
        );
    }

    // Re-placement: n1's OPEN tunnels go round robin to n2 and n3, both sides reset.
    let moved = s
        .reassign_tunnels("n1".into(), vec!["n2".into(), "n3".into()], 2300)
        .await
        .unwrap();
    assert_eq!(ids(&moved), ["f1", "f4"]);
    for (t, to) in moved.iter().zip(["n2", "n3"]) {
        assert_eq!(t.owner_node.as_deref(), Some(to));
        assert_eq!(t, &tunnel(s, &t.id).await, "returned as stored");
        for side in [&t.device, &t.client] {
            assert_eq!((side.connected, side.updated_at), (false, Some(2300)));
        }
    }
    assert_eq!(
        tunnel(s, "f2").await.owner_node.as_deref(),
        Some("n1"),
        "CLOSED stays"
    );
    assert_eq!(
        s.open_tunnels_by_owner().await.unwrap(),
        by_owner(&[("n2", 2), ("n3", 1)])
    );
    let again = s
        .reassign_tunnels("n1".into(), vec!["n2".into()], 2400)
        .await
        .unwrap();
    assert!(again.is_empty(), "idempotent");
    let nowhere = s.reassign_tunnels("n2".into(), vec![], 2400).await.unwrap();
    assert!(nowhere.is_empty(), "no live node: nothing moves");
    assert_eq!(tunnel(s, "f3").await.owner_node.as_deref(), Some("n2"));

    // Device channels: a newer channel replaces, a node clears only its own.
    let channel = |pk: &str, d: &str| s.device_channel_node(pk.into(), d.into());
    let set =
        |pk: &str, d: &str, n: &str, at| s.set_device_channel(pk.into(), d.into(), n.into(), at);
    let clear = |pk: &str, d: &str, n: &str| s.clear_device_channel(pk.into(), d.into(), n.into());
    assert_eq!(channel("pk", "d2").await.unwrap(), None);
    set("pk", "d2", "n1", 10).await.unwrap();
    assert_eq!(channel("pk", "d2").await.unwrap().as_deref(), Some("n1"));
    set("pk", "d2", "n2", 11).await.unwrap();
    clear("pk", "d2", "n1").await.unwrap();
    assert_eq!(
        channel("pk", "d2").await.unwrap().as_deref(),
        Some("n2"),
        "not n1's"
    );
    set("pk", "d3", "n2", 12).await.unwrap();
    set("pk_b", "d9", "n1", 12).await.unwrap();
    let map = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(d, n)| (d.to_string(), n.to_string()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    assert_eq!(
        s.device_channel_nodes("pk".into()).await.unwrap(),
        map(&[("d2", "n2"), ("d3", "n2")])
    );
    clear("pk", "d2", "n2").await.unwrap();
    assert_eq!(channel("pk", "d2").await.unwrap(), None);
    set("pk", "d2", "n1", 13).await.unwrap();
    s.clear_device_channels_of_node("n2".into()).await.unwrap();
    assert_eq!(
        s.device_channel_nodes("pk".into()).await.unwrap(),
        map(&[("d2", "n1")])
    );
    assert_eq!(
        s.device_channel_nodes("pk_b".into()).await.unwrap(),
        map(&[("d9", "n1")])
    );
    assert!(s
        .device_channel_nodes("none".into())
        .await
        .unwrap()
        .is_empty());

    s.publish("hello".into()).await.unwrap();
}

/// Creates tunnels to `device` (limit 3, as [`new_tunnel`]) until the store refuses with
/// `TunnelLimit`; returns the ids created. `next` numbers ids and creation times.
async fn fill(s: &dyn Store, device: &str, owner: Option<&str>, next: &mut i64) -> Vec<String> {
    let mut created = Vec::new();
    loop {
        *next += 1;
        let mut t = new_tunnel(&format!("lim{next}"), device, *next);
        t.owner_node = owner.map(str::to_string);
        match s.create_tunnel(t).await {
            Ok(t) => created.push(t.id),
            Err(e) => {
                assert_eq!(e, StoreError::TunnelLimit(3));
                return created;
            }
        }
        assert!(created.len() <= 3, "the limit of 3 did not hold");
    }
}

/// The per-device limit counts OPEN tunnels through every way a tunnel opens, closes or goes:
/// close, expire, delete (of a CLOSED one), reassign, rotate, connection events, purge and
/// delete_device. Needs a fresh store; leaves `d1` with 3 OPEN tunnels and `d2` with none.
async fn tunnel_limit_contract(s: &dyn Store) {
    seed(s).await;
    let mut next = 0;
    let d1 = fill(s, "d1", None, &mut next).await;
    assert_eq!(d1.len(), 3);
    // Another device has its own count.
    assert_eq!(fill(s, "d2", None, &mut next).await.len(), 3);

    // Close frees one place; deleting the CLOSED tunnel frees none.
    let close = |id: &str| s.close_tunnel("acc_a".into(), id.into(), CloseReason::Closed, 500);
    close(&d1[0]).await.unwrap();
    assert_eq!(close(&d1[0]).await, Err(StoreError::TunnelNotOpen));
    s.delete_tunnel("acc_a".into(), d1[0].clone())
        .await
        .unwrap();
    let refill = fill(s, "d1", None, &mut next).await;
    assert_eq!(refill.len(), 1);

    // Rotation and connection events leave the count alone.
    s.rotate_tokens(
        "acc_a".into(),
        d1[1].clone(),
        Rotation {
            client_token_hash: Some([4; 32]),
            device_token: None,
        },
    )
    .await
    .unwrap();
    connect_all(s, &[&d1[1], &d1[2]], 600).await;
    s.reset_connections("n1".into(), 700).await.unwrap();
    assert!(fill(s, "d1", None, &mut next).await.is_empty());

    // Expiry closes every OPEN tunnel of both devices (all expire by `next + 1000`).
    let expired = s.expire_tunnels(next + 1000).await.unwrap();
    assert_eq!(expired.len(), 6);
    assert_eq!(s.expire_tunnels(next + 1000).await.unwrap().len(), 0);
    let owned = fill(s, "d1", Some("n1"), &mut next).await;
    assert_eq!(owned.len(), 3);

    // Moving tunnels to another node keeps them OPEN and counted.
    let moved = s
        .reassign_tunnels("n1".into(), vec!["n2".into()], 800)
        .await
        .unwrap();
    assert_eq!(moved.len(), 3);
    assert!(fill(s, "d1", None, &mut next).await.is_empty());

    // Purging OPEN tunnels (created before a time) frees their places.
    let purge_before = next;
    let purged = s.purge_tunnels(purge_before).await.unwrap();
    assert!(purged.contains(&owned[0]) && purged.contains(&owned[2]));
    assert_eq!(fill(s, "d1", None, &mut next).await.len(), 3);

    // Deleting the device closes its tunnels; the same name again starts from nothing.
    assert_eq!(
        s.delete_device("acc_a".into(), "pk".into(), "d1".into(), 900)
            .await
            .unwrap()
            .len(),
        3
    );
    let d = Device {
        product_key: "pk".into(),
        account_id: "acc_a".into(),
        name: "d1".into(),
        secret: "s".into(),
        created_at: 900,
        open_tunnels: 0,
    };
    s.create_device(d).await.unwrap();
    assert_eq!(fill(s, "d1", None, &mut next).await.len(), 3);
    assert_eq!(
        s.open_tunnels_of_device("pk".into(), "d1".into())
            .await
            .unwrap()
            .len(),
        3
    );
}

/// Undoes the migration that gave API keys ids, names, origins, last use and revocation.
const UNDO_KEY_COLUMNS: &str = "DROP INDEX api_keys_by_id; DROP INDEX api_keys_by_account; \
    ALTER TABLE api_keys DROP COLUMN id; ALTER TABLE api_keys DROP COLUMN name; \
    ALTER TABLE api_keys DROP COLUMN origin; ALTER TABLE api_keys DROP COLUMN last_used_at; \
    ALTER TABLE api_keys DROP COLUMN revoked_at;";

#[tokio::test]
async fn sqlite_tunnel_limit_counts_every_transition_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = SqliteStore::open(&path).unwrap();
    tunnel_limit_contract(&store).await;
    // Two OPEN tunnels on d2 before the store closes.
    let mut next = 10_000;
    let close = |id: String| store.close_tunnel("acc_a".into(), id, CloseReason::Closed, 1);
    let d2 = fill(&store, "d2", None, &mut next).await;
    close(d2[0].clone()).await.unwrap();
    drop(store);

    // Reopened, the counts are those on disk: d1 full, d2 one place left.
    let store = SqliteStore::open(&path).unwrap();
    assert!(fill(&store, "d1", None, &mut next).await.is_empty());
    assert_eq!(fill(&store, "d2", None, &mut next).await.len(), 1);
    let admin_key = key("key_admin", "acc_admin", 3, KeyOrigin::Generated, 1);
    store
        .create_account("acc_admin".into(), "admin".into(), true, admin_key)
        .await
        .unwrap();
    drop(store);

    // A database from before the counter (and the API keys' columns, added after it): the
    // migrations count what is OPEN and give the keys ids.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "DROP TABLE tunnel_tags; DROP TABLE access_keys; \
         ALTER TABLE devices DROP COLUMN tunnels_disabled; \
         {UNDO_KEY_COLUMNS} \
         DROP TRIGGER tunnels_count_open_insert; DROP TRIGGER tunnels_count_open_update; \
         DROP TRIGGER tunnels_count_open_delete; ALTER TABLE devices DROP COLUMN open_tunnels; \
         PRAGMA user_version = 3;"
    ))
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path).unwrap();
    assert!(fill(&store, "d1", None, &mut next).await.is_empty());
    assert!(fill(&store, "d2", None, &mut next).await.is_empty());
    let d1 = store
        .open_tunnels_of_device("pk".into(), "d1".into())
        .await
        .unwrap();
    store
        .close_tunnel("acc_a".into(), d1[0].id.clone(), CloseReason::Closed, 1)
        .await
        .unwrap();
    assert_eq!(fill(&store, "d1", None, &mut next).await.len(), 1);
    // Keys of old databases get ids; the admin's count as IOTUNNEL_ADMIN_KEY's (retirable).
    let (_, k) = store.account_by_key([9; 32]).await.unwrap().unwrap();
    assert!(k.id.starts_with("key_") && k.id.len() == 20, "{}", k.id);
    assert_eq!(
        (k.origin, k.last_used_at, k.revoked_at),
        (KeyOrigin::Account, None, None)
    );
    let (_, k) = store.account_by_key([3; 32]).await.unwrap().unwrap();
    assert_eq!(
        (k.origin, k.name.as_str()),
        (KeyOrigin::Env, "IOTUNNEL_ADMIN_KEY")
    );
}

#[tokio::test]
async fn postgres_tunnel_limit_counts_every_transition_and_migrates_old_data() {
    let db = TestDatabase::create().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    tunnel_limit_contract(&store).await;
    let mut next = 10_000;
    let d2 = fill(&store, "d2", None, &mut next).await;
    store
        .close_tunnel("acc_a".into(), d2[0].clone(), CloseReason::Closed, 1)
        .await
        .unwrap();
    drop(store);

    // Another node, and then a database from before the counter: the migration counts what is
    // OPEN.
    let store = PgStore::connect(&db.url).await.unwrap();
    assert!(fill(&store, "d1", None, &mut next).await.is_empty());
    drop(store);
    let client = db.client().await;
    let version: i32 = client
        .query_one("SELECT MAX(version) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    // The counter is migration 2; the API keys' columns (3) and the vendor facades' tables (4)
    // go back too.
    assert_eq!(
        version, 4,
        "this rolls back migrations 4 (vendor facades), 3 (API keys) and 2 only while they are the last ones"
    );
    client
        .batch_execute(&format!(
            "{UNDO_KEY_COLUMNS} \
             DROP TRIGGER tunnels_count_open_insert ON tunnels; \
             DROP TRIGGER tunnels_count_open_update ON tunnels; \
             DROP TRIGGER tunnels_count_open_delete ON tunnels; \
             DROP FUNCTION tunnels_count_open_insert(); DROP FUNCTION tunnels_count_open_update(); \
             DROP FUNCTION tunnels_count_open_delete(); \
             ALTER TABLE devices DROP COLUMN open_tunnels; \
             DROP TABLE tunnel_tags; DROP TABLE access_keys; \
             ALTER TABLE devices DROP COLUMN tunnels_disabled; \
             DELETE FROM schema_migrations WHERE version >= 2;",
        ))
        .await
        .unwrap();
    let store = PgStore::connect(&db.url).await.unwrap();
    assert!(fill(&store, "d1", None, &mut next).await.is_empty());
    assert_eq!(fill(&store, "d2", None, &mut next).await.len(), 1);
    let (_, k) = store.account_by_key([9; 32]).await.unwrap().unwrap();
    assert!(k.id.starts_with("key_") && k.id.len() == 20, "{}", k.id);
    assert_eq!(
        (k.origin, k.last_used_at, k.revoked_at),
        (KeyOrigin::Account, None, None)
    );
}

#[tokio::test]
async fn sqlite_meets_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db")).unwrap();
    assert!(store.subscribe().is_none(), "one node: no bus");
    contract(Arc::new(store)).await;
}

#[tokio::test]
async fn postgres_meets_the_store_contract() {
    let db = TestDatabase::create().await;
    // Trust auth ignores the password; it is here to prove Debug and errors never show it.
    let url = db.url.replace("postgres@", "postgres:hunter2@");
    let store = PgStore::connect(&url).await.unwrap();
    assert!(!format!("{store:?}").contains("hunter2"), "{store:?}");
    contract(Arc::new(store)).await;
}

/// Receives the next bus event, failing the test after 10 s.
async fn next_event(rx: &mut tokio::sync::mpsc::UnboundedReceiver<BusEvent>) -> BusEvent {
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("a bus event within 10 s")
        .expect("the subscription stays open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nodes_starting_together_migrate_once() {
    let db = TestDatabase::create().await;
    let (a, b, c) = tokio::join!(
        PgStore::connect(&db.url),
        PgStore::connect(&db.url),
        PgStore::connect(&db.url)
    );
    for store in [a, b, c] {
        store.unwrap().list_nodes().await.unwrap();
    }
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=versions.len() as i32).collect::<Vec<_>>());
    assert!(!versions.is_empty());
    // A fourth node finds nothing to do.
    PgStore::connect(&db.url).await.unwrap();
    let count: i64 = client
        .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count as usize, versions.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_tunnel_limit_holds_across_nodes() {
    const LIMIT: u32 = 5;
    let db = TestDatabase::create().await;
    let mut nodes: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..3 {
        nodes.push(Arc::new(PgStore::connect(&db.url).await.unwrap()));
    }
    seed(nodes[0].as_ref()).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let s = nodes[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut t = new_tunnel(&format!("r{i}"), "d1", i as i64);
            t.max_open_per_device = LIMIT;
            s.create_tunnel(t).await
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(e) => assert_eq!(e, StoreError::TunnelLimit(LIMIT)),
        }
    }
    assert_eq!(created, LIMIT);
    let open = nodes[1]
        .open_tunnels_of_device("pk".into(), "d1".into())
        .await
        .unwrap();
    assert_eq!(open.len(), LIMIT as usize);
}

/// What several nodes race for at once: one lease winner, one secret, no tunnel moved twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_fleet_races_have_one_winner() {
    let db = TestDatabase::create().await;
    let mut nodes: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..3 {
        nodes.push(Arc::new(PgStore::connect(&db.url).await.unwrap()));
    }
    seed(nodes[0].as_ref()).await;
    for i in 0..40 {
        let mut t = new_tunnel(&format!("m{i}"), "d1", i);
        (t.max_open_per_device, t.owner_node) = (100, Some("dead".into()));
        nodes[0].create_tunnel(t).await.unwrap();
    }
    let mut leases = Vec::new();
    let mut secrets = Vec::new();
    let mut moves = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        let s = s.clone();
        let me = format!("n{i}");
        leases.push(tokio::spawn({
            let (s, me) = (s.clone(), me.clone());
            async move { s.try_lease("sweeper".into(), me, 100, 1000).await }
        }));
        secrets.push(tokio::spawn({
            let s = s.clone();
            async move { s.fleet_secret("mesh".into(), vec![i as u8; 32]).await }
        }));
        moves.push(tokio::spawn(async move {
            s.reassign_tunnels("dead".into(), vec![me], 200).await
        }));
    }
    let mut won = 0;
    for l in leases {
        won += l.await.unwrap().unwrap() as u32;
    }
    assert_eq!(won, 1, "one node holds the lease");
    let mut values = Vec::new();
    for s in secrets {
        values.push(s.await.unwrap().unwrap());
    }
    assert!(
        values.windows(2).all(|w| w[0] == w[1]),
        "one secret for all"
    );
    let mut moved: Vec<String> = Vec::new();
    for m in moves {
        moved.extend(m.await.unwrap().unwrap().into_iter().map(|t| t.id));
    }
    moved.sort();
    let before = moved.len();
    moved.dedup();
    assert_eq!(
        (before, moved.len()),
        (40, 40),
        "every tunnel moved exactly once"
    );
    let owners = nodes[0].open_tunnels_by_owner().await.unwrap();
    assert_eq!(owners.iter().map(|(_, n)| n).sum::<u64>(), 40);
    assert!(owners.iter().all(|(n, _)| n != "dead"));
}

#[tokio::test]
async fn postgres_bus_reaches_every_node() {
    let db = TestDatabase::create().await;
    let a = PgStore::connect(&db.url).await.unwrap();
    let b = PgStore::connect(&db.url).await.unwrap();
    let mut on_a = a.subscribe().expect("PostgreSQL has a bus");
    let mut on_b = b.subscribe().expect("PostgreSQL has a bus");
    assert_eq!(next_event(&mut on_a).await, BusEvent::Resynced);
    assert_eq!(next_event(&mut on_b).await, BusEvent::Resynced);
    a.publish("close t1".into()).await.unwrap();
    b.publish("rotate t2".into()).await.unwrap();
    for rx in [&mut on_a, &mut on_b] {
        assert_eq!(next_event(rx).await, BusEvent::Message("close t1".into()));
        assert_eq!(next_event(rx).await, BusEvent::Message("rotate t2".into()));
    }
}

#[tokio::test]
async fn postgres_bus_survives_a_killed_listener() {
    let db = TestDatabase::create().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let mut rx = store.subscribe().unwrap();
    assert_eq!(next_event(&mut rx).await, BusEvent::Resynced);
    let killed: i64 = db
        .client()
        .await
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity              WHERE datname = current_database() AND application_name = $1",
            &[&iotunnel::store::postgres::BUS_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "one listener connection");
    assert_eq!(next_event(&mut rx).await, BusEvent::Resynced, "reconnected");
    store.publish("after".into()).await.unwrap();
    assert_eq!(next_event(&mut rx).await, BusEvent::Message("after".into()));
}

#[tokio::test]
async fn postgres_tls_modes() {
    let db = TestDatabase::create().await;
    let admin = db.client().await;
    let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    let url = |params: &str| format!("{}?{params}", db.url);
    if ssl != "on" {
        let err = PgStore::connect(&url("sslmode=require")).await.unwrap_err();
        assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
        return;
    }
    let store = PgStore::connect(&url("sslmode=require")).await.unwrap();
    store.list_nodes().await.unwrap();
    let encrypted: i64 = admin
        .query_one(
            "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)              WHERE a.datname = current_database() AND s.ssl AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the pooled connection is encrypted");
    // The server's own certificate as the root (Debian's snakeoil names `localhost`).
    let cert: String = admin
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0);
    let with_root = |mode: &str, host: &str| {
        url(&format!("sslmode={mode}&sslrootcert={cert}")).replace("127.0.0.1", host)
    };
    PgStore::connect(&with_root("verify-ca", "127.0.0.1"))
        .await
        .expect("verify-ca ignores the host name");
    PgStore::connect(&with_root("verify-full", "localhost"))
        .await
        .expect("verify-full: the chain and the name match");
    let err = PgStore::connect(&with_root("verify-full", "127.0.0.1"))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
    let webpki = PgStore::connect(&url("sslmode=verify-full"))
        .await
        .unwrap_err();
    assert!(
        format!("{webpki:#}").contains("cannot connect"),
        "{webpki:#}"
    );
}

#[tokio::test]
async fn postgres_bad_urls_fail_clearly() {
    let err = PgStore::connect("postgres://u:hunter2@127.0.0.1:1/db?sslmode=disable")
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("cannot connect to PostgreSQL at 127.0.0.1:1/db"),
        "{msg}"
    );
    assert!(!msg.contains("hunter2"), "{msg}");
    for bad in [
        "not a url",
        "postgres://u:hunter2@h/db?sslmode=maybe",
        "postgres://u:hunter2@h:notaport/db",
        "postgres://h/db?sslrootcert=/nonexistent.pem",
    ] {
        let msg = format!("{:#}", PgStore::connect(bad).await.unwrap_err());
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(!msg.is_empty());
    }
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
