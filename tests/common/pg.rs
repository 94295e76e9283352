//! PostgreSQL for tests: a fresh database per test on the server CI starts (127.0.0.1:5432),
//! dropped when the test ends. A test that needs PostgreSQL fails, never skips, without it.
use std::sync::atomic::{AtomicU32, Ordering};

/// Where [`TestDatabase::create`] creates databases unless `IOTUNNEL_TEST_PG_ADMIN_URL` says
/// otherwise (trust auth on loopback, as `.ci/run` sets it up).
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database of its own for one test; dropped (`WITH (FORCE)`) with this value.
pub struct TestDatabase {
    /// URL of the new database, for `PgStore::connect` or `iotunnel server --database-url`.
    pub url: String,
    /// Its name.
    pub name: String,
    admin_url: String,
}

/// The admin URL in force (`IOTUNNEL_TEST_PG_ADMIN_URL`, else [`DEFAULT_ADMIN_URL`]).
pub fn admin_url() -> String {
    std::env::var("IOTUNNEL_TEST_PG_ADMIN_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into())
}

/// A plain connection to `url` (no TLS), driven on the current runtime; panics with a clear
/// message when PostgreSQL is not there.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "this test needs PostgreSQL at {} and cannot reach it: {e}. `.ci/run` starts \
                 it; or point IOTUNNEL_TEST_PG_ADMIN_URL at a server where this user may \
                 create databases",
                without_password(url)
            )
        });
    tokio::spawn(connection);
    client
}

fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    format!("{}/{name}{query}", &base[..host_end])
}

impl TestDatabase {
    /// Creates a uniquely named, empty database.
    pub async fn create() -> TestDatabase {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let admin_url = admin_url();
        let name = format!(
            "iotunnel_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let admin = connect(&admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        TestDatabase {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
        }
    }

    /// A plain connection to this database, for what the store does not expose.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Its own thread and runtime: this may run inside an async test's runtime, where
        // blocking on another future is not allowed.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
            .map_err(std::io::Error::other)
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("cannot drop test database {}: {e}", self.name);
        }
    }
}
