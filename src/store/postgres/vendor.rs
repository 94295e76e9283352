//! The vendor facades' calls on PostgreSQL: access keys, tunnel tags and the per-device tunnel
//! switch.
use super::*;

fn key_from_row(r: &Row) -> StoreResult<AccessKey> {
    Ok(AccessKey {
        id: r.try_get(0).map_err(db_err)?,
        account_id: r.try_get(1).map_err(db_err)?,
        sealed_secret: r.try_get(2).map_err(db_err)?,
        created_at: r.try_get(3).map_err(db_err)?,
    })
}

/// NotFound unless the tunnel exists and is the account's.
async fn tunnel_owned(
    c: &impl GenericClient,
    account_id: &str,
    tunnel_id: &str,
) -> StoreResult<()> {
    query_opt(
        c,
        "SELECT 1 FROM tunnels WHERE id = $1 AND account_id = $2",
        &[&tunnel_id, &account_id],
    )
    .await?
    .map(drop)
    .ok_or(StoreError::NotFound)
}

impl PgStore {
    pub(super) async fn create_access_key_impl(&self, k: AccessKey) -> StoreResult<()> {
        let c = self.client().await?;
        let n = execute(
            &c,
            "INSERT INTO access_keys (id, account_id, sealed_secret, created_at) \
             SELECT $1, id, $3, $4 FROM accounts WHERE id = $2",
            &[&k.id, &k.account_id, &k.sealed_secret, &k.created_at],
        )
        .await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub(super) async fn list_access_keys_impl(
        &self,
        account_id: String,
    ) -> StoreResult<Vec<AccessKey>> {
        let c = self.client().await?;
        query(
            &c,
            "SELECT id, account_id, sealed_secret, created_at FROM access_keys \
             WHERE account_id = $1 ORDER BY created_at, id",
            &[&account_id],
        )
        .await?
        .iter()
        .map(key_from_row)
        .collect()
    }

    pub(super) async fn delete_access_key_impl(
        &self,
        account_id: String,
        key_id: String,
    ) -> StoreResult<()> {
        let c = self.client().await?;
        let n = execute(
            &c,
            "DELETE FROM access_keys WHERE id = $1 AND account_id = $2",
            &[&key_id, &account_id],
        )
        .await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub(super) async fn access_key_impl(
        &self,
        key_id: String,
    ) -> StoreResult<Option<(AccessKey, Account)>> {
        let c = self.client().await?;
        let row = query_opt(
            &c,
            "SELECT k.id, k.account_id, k.sealed_secret, k.created_at, \
             a.id, a.name, a.is_admin, a.created_at \
             FROM access_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = $1",
            &[&key_id],
        )
        .await?;
        let Some(r) = row else { return Ok(None) };
        let account = Account {
            id: r.try_get(4).map_err(db_err)?,
            name: r.try_get(5).map_err(db_err)?,
            is_admin: r.try_get(6).map_err(db_err)?,
            created_at: r.try_get(7).map_err(db_err)?,
        };
        Ok(Some((key_from_row(&r)?, account)))
    }

    pub(super) async fn tunnel_tags_impl(
        &self,
        account_id: String,
        tunnel_id: String,
    ) -> StoreResult<Vec<(String, String)>> {
        let c = self.client().await?;
        tunnel_owned(&c, &account_id, &tunnel_id).await?;
        query(
            &c,
            "SELECT key, value FROM tunnel_tags WHERE tunnel_id = $1 ORDER BY key",
            &[&tunnel_id],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0).map_err(db_err)?, r.try_get(1).map_err(db_err)?)))
        .collect()
    }

    pub(super) async fn tag_tunnel_impl(
        &self,
        account_id: String,
        tunnel_id: String,
        tags: Vec<(String, String)>,
    ) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        tunnel_owned(&tx, &account_id, &tunnel_id).await?;
        for (k, v) in &tags {
            execute(
                &tx,
                "INSERT INTO tunnel_tags (tunnel_id, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (tunnel_id, key) DO UPDATE SET value = EXCLUDED.value",
                &[&tunnel_id, k, v],
            )
            .await?;
        }
        tx.commit().await.map_err(db_err)
    }

    pub(super) async fn untag_tunnel_impl(
        &self,
        account_id: String,
        tunnel_id: String,
        keys: Vec<String>,
    ) -> StoreResult<()> {
        let c = self.client().await?;
        tunnel_owned(&c, &account_id, &tunnel_id).await?;
        execute(
            &c,
            "DELETE FROM tunnel_tags WHERE tunnel_id = $1 AND key = ANY($2)",
            &[&tunnel_id, &keys],
        )
        .await
        .map(drop)
    }

    pub(super) async fn set_device_tunnels_disabled_impl(
        &self,
        account_id: String,
        product_key: String,
        device_name: String,
        disabled: bool,
    ) -> StoreResult<()> {
        let c = self.client().await?;
        let n = execute(
            &c,
            "UPDATE devices SET tunnels_disabled = $4 WHERE product_key = $1 AND name = $2 \
             AND product_key IN (SELECT product_key FROM products WHERE account_id = $3)",
            &[&product_key, &device_name, &account_id, &disabled],
        )
        .await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub(super) async fn device_tunnels_disabled_impl(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<bool> {
        let c = self.client().await?;
        Ok(query_opt(
            &c,
            "SELECT tunnels_disabled FROM devices WHERE product_key = $1 AND name = $2",
            &[&product_key, &device_name],
        )
        .await?
        .map(|r| r.try_get::<_, bool>(0))
        .transpose()
        .map_err(db_err)?
        .unwrap_or(false))
    }
}
