//! `iotunnel key list|create|revoke`: the caller's API keys (the admin's: every account's).
use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

use super::{enc, ApiClient, ApiOpts};

/// `iotunnel key ...`
#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// List unrevoked API keys: your account's (the admin key: every account's). Never secrets.
    List {
        /// Only this account's keys (admin key only).
        #[arg(long)]
        account_id: Option<String>,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// Create an API key and print it (once).
    Create {
        /// A label, e.g. what will use the key.
        #[arg(long)]
        name: String,
        /// The account the key is for (admin key only) [default: yours].
        #[arg(long)]
        account_id: Option<String>,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// Revoke an API key at once (by its id, from `key list`).
    Revoke {
        /// Key id (`key_...`).
        key_id: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
}

/// Runs a `key` subcommand.
pub(super) async fn run(cmd: KeyCmd) -> anyhow::Result<()> {
    match cmd {
        KeyCmd::List { account_id, api } => {
            let c = ApiClient::new(api)?;
            let path = match account_id {
                Some(a) => format!("/v1/keys?account_id={}", enc(&a)),
                None => "/v1/keys".into(),
            };
            let v = c.call(Method::GET, &path, None).await?;
            let rows = v["keys"].as_array().cloned().unwrap_or_default();
            c.print(
                &v,
                &rows,
                &[
                    ("KEY ID", "/key_id"),
                    ("ACCOUNT", "/account_id"),
                    ("NAME", "/name"),
                    ("ORIGIN", "/origin"),
                    ("CREATED", "/created_at"),
                    ("LAST USED", "/last_used_at"),
                    ("CURRENT", "/current"),
                ],
            );
        }
        KeyCmd::Create {
            name,
            account_id,
            api,
        } => {
            let c = ApiClient::new(api)?;
            let mut body = json!({ "name": name });
            if let Some(a) = account_id {
                body["account_id"] = json!(a);
            }
            let v = c.call(Method::POST, "/v1/keys", Some(body)).await?;
            c.print(
                &v,
                std::slice::from_ref(&v),
                &[
                    ("KEY ID", "/key_id"),
                    ("ACCOUNT", "/account_id"),
                    ("API KEY (shown once)", "/api_key"),
                ],
            );
        }
        KeyCmd::Revoke { key_id, api } => {
            let c = ApiClient::new(api)?;
            c.call(Method::DELETE, &format!("/v1/keys/{}", enc(&key_id)), None)
                .await?;
            if !c.json {
                println!("API key {key_id} revoked");
            }
        }
    }
    Ok(())
}
