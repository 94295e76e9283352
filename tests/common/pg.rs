//! A fresh PostgreSQL database per test on 127.0.0.1:5432 (trust auth), dropped on Drop.
//! A stand-in until the `pg` branch's helper of the same interface lands on main.
use std::process::Command;

/// A database of its own; dropped (connections and all) when this value is.
pub struct TestDatabase {
    pub url: String,
    name: String,
}

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

fn psql(sql: &str) -> std::process::Output {
    Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!("{SERVER}/postgres"))
        .args(["-c", sql])
        .output()
        .unwrap_or_else(|e| {
            panic!("psql cannot run ({e}): these tests need PostgreSQL's client and a server on 127.0.0.1:5432 (apt-get install -y postgresql)")
        })
}

impl TestDatabase {
    /// Creates a fresh, empty database.
    pub async fn create() -> TestDatabase {
        let name = format!("iotunnel_test_{}", hex::encode(rand::random::<[u8; 8]>()));
        let out = tokio::task::spawn_blocking({
            let sql = format!("CREATE DATABASE {name}");
            move || psql(&sql)
        })
        .await
        .unwrap();
        assert!(
        out.status.success(),
        "cannot create a database on {SERVER} (is PostgreSQL running, with trust auth for 127.0.0.1?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
        TestDatabase {
            url: format!("{SERVER}/{name}"),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}
