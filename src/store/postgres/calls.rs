//! [`Store`] on PostgreSQL: each call on a pooled connection, in one transaction where it reads
//! before it writes.
use async_trait::async_trait;

use super::*;

#[async_trait]
impl Store for PgStore {
    async fn admin_account(&self) -> StoreResult<Option<Account>> {
        let c = self.client().await?;
        let sql = "SELECT id, name, is_admin, created_at FROM accounts WHERE is_admin LIMIT 1";
        query_opt(&c, sql, &[])
            .await?
            .as_ref()
            .map(account_from_row)
            .transpose()
    }

    async fn create_account(
        &self,
        id: String,
        name: String,
        is_admin: bool,
        key: NewApiKey,
    ) -> StoreResult<Account> {
        let now = key.created_at;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        execute(
            &tx,
            "INSERT INTO accounts (id, name, is_admin, created_at) VALUES ($1, $2, $3, $4)",
            &[&id, &name, &is_admin, &now],
        )
        .await?;
        let key = NewApiKey {
            account_id: id.clone(),
            ..key
        };
        if keys::insert(&tx, &key).await? == 0 {
            return Err(StoreError::AlreadyExists);
        }
        tx.commit().await.map_err(db_err)?;
        Ok(Account {
            id,
            name,
            is_admin,
            created_at: now,
        })
    }

    async fn add_api_key(&self, key: NewApiKey) -> StoreResult<ApiKey> {
        let c = self.client().await?;
        keys::add(&c, &key).await
    }

    async fn account_by_key(&self, key_hash: SecretHash) -> StoreResult<Option<(Account, ApiKey)>> {
        let c = self.client().await?;
        keys::account_by_key(&c, &key_hash).await
    }

    async fn list_api_keys(&self, account_id: Option<String>) -> StoreResult<Vec<ApiKey>> {
        let c = self.client().await?;
        keys::list(&c, account_id.as_deref()).await
    }

    async fn revoke_api_key(
        &self,
        account_id: Option<String>,
        key_id: String,
        now: Millis,
    ) -> StoreResult<ApiKey> {
        let c = self.client().await?;
        keys::revoke(&c, account_id.as_deref(), &key_id, now).await
    }

    async fn retire_api_keys(
        &self,
        account_id: String,
        origin: KeyOrigin,
        keep_id: String,
        now: Millis,
    ) -> StoreResult<Vec<ApiKey>> {
        let c = self.client().await?;
        keys::retire(&c, &account_id, origin, &keep_id, now).await
    }

    async fn touch_api_key(&self, key_id: String, at: Millis) -> StoreResult<()> {
        let c = self.client().await?;
        keys::touch(&c, &key_id, at).await
    }

    async fn create_access_key(&self, key: AccessKey) -> StoreResult<()> {
        self.create_access_key_impl(key).await
    }

    async fn list_access_keys(&self, account_id: String) -> StoreResult<Vec<AccessKey>> {
        self.list_access_keys_impl(account_id).await
    }

    async fn delete_access_key(&self, account_id: String, key_id: String) -> StoreResult<()> {
        self.delete_access_key_impl(account_id, key_id).await
    }

    async fn access_key(&self, key_id: String) -> StoreResult<Option<(AccessKey, Account)>> {
        self.access_key_impl(key_id).await
    }

    async fn tunnel_tags(
        &self,
        account_id: String,
        tunnel_id: String,
    ) -> StoreResult<Vec<(String, String)>> {
        self.tunnel_tags_impl(account_id, tunnel_id).await
    }

    async fn tag_tunnel(
        &self,
        account_id: String,
        tunnel_id: String,
        tags: Vec<(String, String)>,
    ) -> StoreResult<()> {
        self.tag_tunnel_impl(account_id, tunnel_id, tags).await
    }

    async fn untag_tunnel(
        &self,
        account_id: String,
        tunnel_id: String,
        keys: Vec<String>,
    ) -> StoreResult<()> {
        self.untag_tunnel_impl(account_id, tunnel_id, keys).await
    }

    async fn set_device_tunnels_disabled(
        &self,
        account_id: String,
        product_key: String,
        device_name: String,
        disabled: bool,
    ) -> StoreResult<()> {
        self.set_device_tunnels_disabled_impl(account_id, product_key, device_name, disabled)
            .await
    }

    async fn device_tunnels_disabled(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<bool> {
        self.device_tunnels_disabled_impl(product_key, device_name)
            .await
    }

    async fn create_product(&self, p: Product) -> StoreResult<Product> {
        let c = self.client().await?;
        execute(
            &c,
            "INSERT INTO products (product_key, account_id, name, created_at) \
             VALUES ($1, $2, $3, $4)",
            &[&p.product_key, &p.account_id, &p.name, &p.created_at],
        )
        .await?;
        Ok(p)
    }

    async fn list_products(&self, account_id: String) -> StoreResult<Vec<Product>> {
        let c = self.client().await?;
        let sql = "SELECT product_key, account_id, name, created_at FROM products \
                   WHERE account_id = $1 ORDER BY created_at, product_key";
        query(&c, sql, &[&account_id])
            .await?
            .iter()
            .map(|r| {
                Ok(Product {
                    product_key: r.try_get(0)?,
                    account_id: r.try_get(1)?,
                    name: r.try_get(2)?,
                    created_at: r.try_get(3)?,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(db_err)
    }

    async fn create_device(&self, d: Device) -> StoreResult<Device> {
        let c = self.client().await?;
        // One statement: the product's owner is checked where the row is written.
        let n = execute(
            &c,
            "INSERT INTO devices (product_key, name, secret, created_at) \
             SELECT product_key, $2, $3, $4 FROM products \
             WHERE product_key = $1 AND account_id = $5",
            &[
                &d.product_key,
                &d.name,
                &d.secret,
                &d.created_at,
                &d.account_id,
            ],
        )
        .await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(d)
    }

    async fn list_devices(
        &self,
        account_id: String,
        product_key: String,
    ) -> StoreResult<Vec<Device>> {
        let c = self.client().await?;
        product_owned(&c, &account_id, &product_key).await?;
        let sql = "SELECT product_key, name, secret, created_at, open_tunnels FROM devices \
                   WHERE product_key = $1 ORDER BY created_at, name";
        query(&c, sql, &[&product_key])
            .await?
            .iter()
            .map(|r| {
                Ok(Device {
                    product_key: r.try_get(0)?,
                    account_id: account_id.clone(),
                    name: r.try_get(1)?,
                    secret: r.try_get(2)?,
                    created_at: r.try_get(3)?,
                    open_tunnels: r.try_get::<_, i64>(4)? as u32,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(db_err)
    }

    async fn get_device(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<Option<Device>> {
        let c = self.client().await?;
        let sql = "SELECT d.product_key, p.account_id, d.name, d.secret, d.created_at, \
                   d.open_tunnels FROM devices d JOIN products p ON p.product_key = d.product_key \
                   WHERE d.product_key = $1 AND d.name = $2";
        let Some(r) = query_opt(&c, sql, &[&product_key, &device_name]).await? else {
            return Ok(None);
        };
        let device = || -> Result<Device, tokio_postgres::Error> {
            Ok(Device {
                product_key: r.try_get(0)?,
                account_id: r.try_get(1)?,
                name: r.try_get(2)?,
                secret: r.try_get(3)?,
                created_at: r.try_get(4)?,
                open_tunnels: r.try_get::<_, i64>(5)? as u32,
            })
        };
        device().map(Some).map_err(db_err)
    }

    async fn delete_device(
        &self,
        account_id: String,
        product_key: String,
        device_name: String,
        now: Millis,
    ) -> StoreResult<Vec<Tunnel>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        product_owned(&tx, &account_id, &product_key).await?;
        // Tunnel rows before the device row, the order every close takes (the counting
        // triggers lock the device after the tunnels): no deadlock with a concurrent close.
        query(
            &tx,
            "SELECT 1 FROM tunnels WHERE product_key = $1 AND device_name = $2 \
             AND state = 'OPEN' ORDER BY seq FOR UPDATE",
            &[&product_key, &device_name],
        )
        .await?;
        // Deleting locks the device row: a concurrent create_tunnel waits, then finds no device.
        // One that committed before it is seen by the close below (a statement of its own).
        let n = execute(
            &tx,
            "DELETE FROM devices WHERE product_key = $1 AND name = $2",
            &[&product_key, &device_name],
        )
        .await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        let closed = close_where(
            &tx,
            "product_key = $3 AND device_name = $4",
            &[&product_key, &device_name],
            CloseReason::DeviceDeleted,
            now,
        )
        .await?;
        tx.commit().await.map_err(db_err)?;
        Ok(closed)
    }

    async fn create_tunnel(&self, t: NewTunnel) -> StoreResult<Tunnel> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        // The device's row lock serialises creates for one device across every node, so the
        // count it carries (kept by the triggers of migration 2) cannot be stale when the
        // insert lands.
        let open: i64 = query_opt(
            &tx,
            "SELECT d.open_tunnels FROM devices d JOIN products p ON p.product_key = d.product_key \
             WHERE d.product_key = $1 AND d.name = $2 AND p.account_id = $3 FOR UPDATE OF d",
            &[&t.product_key, &t.device_name, &t.account_id],
        )
        .await?
        .ok_or(StoreError::NotFound)?
        .try_get(0)
        .map_err(db_err)?;
        if open >= i64::from(t.max_open_per_device) {
            return Err(StoreError::TunnelLimit(t.max_open_per_device));
        }
        let row = query_opt(
            &tx,
            "INSERT INTO tunnels (id, account_id, product_key, device_name, custom_info, \
             description, services, state, created_at, expires_at, client_token_hash, \
             device_token_hash, device_token_seed, owner_node) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'OPEN', $8, $9, $10, $11, $12, $13) \
             RETURNING seq",
            &[
                &t.id,
                &t.account_id,
                &t.product_key,
                &t.device_name,
                &t.custom_info,
                &t.description,
                &t.services,
                &t.created_at,
                &t.expires_at,
                &&t.client_token_hash[..],
                &&t.device_token_hash[..],
                &&t.device_token_seed[..],
                &t.owner_node,
            ],
        )
        .await?;
        let seq: i64 = match row {
            Some(r) => r.try_get(0).map_err(db_err)?,
            None => return Err(StoreError::Unavailable("insert returned no row".into())),
        };
        tx.commit().await.map_err(db_err)?;
        Ok(Tunnel {
            seq,
            id: t.id,
            account_id: t.account_id,
            product_key: t.product_key,
            device_name: t.device_name,
            custom_info: t.custom_info,
            description: t.description,
            services: t.services,
            state: TunnelState::Open,
            created_at: t.created_at,
            expires_at: t.expires_at,
            closed_at: None,
            close_reason: None,
            client_token_hash: t.client_token_hash,
            device_token_hash: t.device_token_hash,
            device_token_seed: t.device_token_seed,
            device: PeerStatus::default(),
            client: PeerStatus::default(),
            owner_node: t.owner_node,
        })
    }

    async fn get_tunnel(&self, account_id: String, tunnel_id: String) -> StoreResult<Tunnel> {
        let c = self.client().await?;
        one_tunnel(&c, &account_id, &tunnel_id).await
    }

    async fn search_tunnels(
        &self,
        account_id: String,
        f: TunnelFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<TunnelPage> {
        let c = self.client().await?;
        let state = f.state.map(TunnelState::as_str);
        let mut tunnels = query_tunnels(
            &c,
            "account_id = $1 AND ($2::TEXT IS NULL OR product_key = $2) \
             AND ($3::TEXT IS NULL OR device_name = $3) AND ($4::TEXT IS NULL OR id = $4) \
             AND ($5::TEXT IS NULL OR state = $5) AND seq < $6 ORDER BY seq DESC LIMIT $7",
            &[
                &account_id,
                &f.product_key,
                &f.device_name,
                &f.tunnel_id,
                &state,
                &before_seq.unwrap_or(i64::MAX),
                &(i64::from(limit) + 1),
            ],
        )
        .await?;
        let more = tunnels.len() > limit as usize;
        tunnels.truncate(limit as usize);
        let next_before_seq = more.then(|| tunnels.last().map(|t| t.seq)).flatten();
        Ok(TunnelPage {
            tunnels,
            next_before_seq,
        })
    }

    async fn close_tunnel(
        &self,
        account_id: String,
        tunnel_id: String,
        reason: CloseReason,
        now: Millis,
    ) -> StoreResult<Tunnel> {
        let c = self.client().await?;
        let closed = close_where(
            &c,
            "id = $3 AND account_id = $4",
            &[&tunnel_id, &account_id],
            reason,
            now,
        )
        .await?;
        match closed.into_iter().next() {
            Some(t) => Ok(t),
            // Not closed here: tell "not yours or absent" from "already CLOSED".
            None => one_tunnel(&c, &account_id, &tunnel_id)
                .await
                .and(Err(StoreError::TunnelNotOpen)),
        }
    }

    async fn delete_tunnel(&self, account_id: String, tunnel_id: String) -> StoreResult<()> {
        let c = self.client().await?;
        let n = execute(
            &c,
            "DELETE FROM tunnels WHERE id = $1 AND account_id = $2 AND state = 'CLOSED'",
            &[&tunnel_id, &account_id],
        )
        .await?;
        if n == 1 {
            return Ok(());
        }
        one_tunnel(&c, &account_id, &tunnel_id)
            .await
            .and(Err(StoreError::TunnelNotClosed))
    }

    async fn rotate_tokens(
        &self,
        account_id: String,
        tunnel_id: String,
        r: Rotation,
    ) -> StoreResult<Tunnel> {
        let c = self.client().await?;
        let client_hash = r.client_token_hash.map(|h| h.to_vec());
        let (device_hash, device_seed) = match r.device_token {
            Some((h, s)) => (Some(h.to_vec()), Some(s.to_vec())),
            None => (None, None),
        };
        let sql = format!(
            "UPDATE tunnels SET client_token_hash = COALESCE($3, client_token_hash), \
             device_token_hash = COALESCE($4, device_token_hash), \
             device_token_seed = COALESCE($5, device_token_seed) \
             WHERE id = $1 AND account_id = $2 AND state = 'OPEN' RETURNING {TUNNEL_COLUMNS}"
        );
        let rows = query(
            &c,
            &sql,
            &[
                &tunnel_id,
                &account_id,
                &client_hash,
                &device_hash,
                &device_seed,
            ],
        )
        .await?;
        match rows.first() {
            Some(row) => tunnel_from_row(row),
            None => one_tunnel(&c, &account_id, &tunnel_id)
                .await
                .and(Err(StoreError::TunnelNotOpen)),
        }
    }

    async fn open_tunnels_of_device(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<Vec<Tunnel>> {
        let c = self.client().await?;
        query_tunnels(
            &c,
            "product_key = $1 AND device_name = $2 AND state = 'OPEN' ORDER BY seq",
            &[&product_key, &device_name],
        )
        .await
    }

    async fn all_open_tunnels(&self) -> StoreResult<Vec<Tunnel>> {
        let c = self.client().await?;
        query_tunnels(&c, "state = 'OPEN' ORDER BY seq", &[]).await
    }

    async fn expire_tunnels(&self, now: Millis) -> StoreResult<Vec<Tunnel>> {
        let c = self.client().await?;
        close_where(&c, "expires_at <= $3", &[&now], CloseReason::Expired, now).await
    }

    async fn purge_tunnels(&self, created_before: Millis) -> StoreResult<Vec<String>> {
        let c = self.client().await?;
        let sql = "DELETE FROM tunnels WHERE created_at <= $1 RETURNING id";
        query(&c, sql, &[&created_before])
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(db_err)
    }

    async fn reset_connections(&self, node_id: String, now: Millis) -> StoreResult<()> {
        let c = self.client().await?;
        for side in ["device", "client"] {
            let sql = format!(
                "UPDATE tunnels SET {side}_connected = FALSE, {side}_updated_at = $1 \
                 WHERE {side}_connected AND (owner_node = $2 OR owner_node IS NULL)"
            );
            execute(&c, &sql, &[&now, &node_id]).await?;
        }
        Ok(())
    }

    async fn apply_connection_events(&self, events: Vec<ConnectionEvent>) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        for e in &events {
            let side = e.side.as_str();
            // An event older than the side's last change is stale: the node a tunnel left may
            // report its peers' end after the new owner reported theirs.
            let not_older = format!("({side}_updated_at IS NULL OR {side}_updated_at <= $1)");
            match &e.kind {
                ConnectionEventKind::Connected { addr } => {
                    let sql = format!(
                        "UPDATE tunnels SET {side}_connected = TRUE, {side}_updated_at = $1, \
                         {side}_addr = $2, {side}_bytes_sent = 0, {side}_bytes_received = 0 \
                         WHERE id = $3 AND {not_older}"
                    );
                    execute(&tx, &sql, &[&e.at, addr, &e.tunnel_id]).await?
                }
                ConnectionEventKind::Disconnected { .. } => {
                    let sql = format!(
                        "UPDATE tunnels SET {side}_connected = FALSE, {side}_updated_at = $1 \
                         WHERE id = $2 AND {not_older}"
                    );
                    execute(&tx, &sql, &[&e.at, &e.tunnel_id]).await?
                }
                ConnectionEventKind::Rtt {
                    last_us,
                    smoothed_us,
                } => {
                    let sql = format!(
                        "UPDATE tunnels SET {side}_rtt_us = $1, {side}_srtt_us = $2 WHERE id = $3"
                    );
                    let (last, smoothed) = (*last_us as i64, *smoothed_us as i64);
                    execute(&tx, &sql, &[&last, &smoothed, &e.tunnel_id]).await?
                }
                ConnectionEventKind::Traffic { sent, received } => {
                    let sql = format!(
                        "UPDATE tunnels SET {side}_bytes_sent = $1, {side}_bytes_received = $2 \
                         WHERE id = $3"
                    );
                    let (sent, received) = (*sent as i64, *received as i64);
                    execute(&tx, &sql, &[&sent, &received, &e.tunnel_id]).await?
                }
            };
        }
        tx.commit().await.map_err(db_err)
    }

    async fn upsert_node(&self, node: NodeRecord) -> StoreResult<()> {
        fleet::upsert_node(&self.client().await?, &node).await
    }

    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        fleet::list_nodes(&self.client().await?).await
    }

    async fn fleet_secret(&self, name: String, proposed: Vec<u8>) -> StoreResult<Vec<u8>> {
        fleet::fleet_secret(&self.client().await?, &name, &proposed).await
    }

    async fn try_lease(
        &self,
        name: String,
        holder: String,
        now: Millis,
        ttl_ms: i64,
    ) -> StoreResult<bool> {
        fleet::try_lease(&self.client().await?, &name, &holder, now, ttl_ms).await
    }

    async fn open_tunnels_by_owner(&self) -> StoreResult<Vec<(String, u64)>> {
        fleet::open_tunnels_by_owner(&self.client().await?).await
    }

    async fn reassign_tunnels(
        &self,
        from_node: String,
        to_nodes: Vec<String>,
        now: Millis,
    ) -> StoreResult<Vec<Tunnel>> {
        if to_nodes.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let moved = fleet::reassign_tunnels(&tx, &from_node, &to_nodes, now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(moved)
    }

    async fn set_device_channel(
        &self,
        product_key: String,
        device_name: String,
        node_id: String,
        now: Millis,
    ) -> StoreResult<()> {
        let c = self.client().await?;
        execute(
            &c,
            "INSERT INTO device_channels (product_key, device_name, node_id, connected_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (product_key, device_name) \
             DO UPDATE SET node_id = EXCLUDED.node_id, connected_at = EXCLUDED.connected_at",
            &[&product_key, &device_name, &node_id, &now],
        )
        .await
        .map(drop)
    }

    async fn clear_device_channel(
        &self,
        product_key: String,
        device_name: String,
        node_id: String,
    ) -> StoreResult<()> {
        let c = self.client().await?;
        execute(
            &c,
            "DELETE FROM device_channels WHERE product_key = $1 AND device_name = $2 \
             AND node_id = $3",
            &[&product_key, &device_name, &node_id],
        )
        .await
        .map(drop)
    }

    async fn clear_device_channels_of_node(&self, node_id: String) -> StoreResult<()> {
        let c = self.client().await?;
        let sql = "DELETE FROM device_channels WHERE node_id = $1";
        execute(&c, sql, &[&node_id]).await.map(drop)
    }

    async fn device_channel_node(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<Option<String>> {
        let c = self.client().await?;
        let sql = "SELECT node_id FROM device_channels WHERE product_key = $1 AND device_name = $2";
        query_opt(&c, sql, &[&product_key, &device_name])
            .await?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(db_err)
    }

    async fn device_channel_nodes(
        &self,
        product_key: String,
    ) -> StoreResult<std::collections::HashMap<String, String>> {
        let c = self.client().await?;
        let sql = "SELECT device_name, node_id FROM device_channels WHERE product_key = $1";
        query(&c, sql, &[&product_key])
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, _>>()
            .map_err(db_err)
    }

    async fn publish(&self, payload: String) -> StoreResult<()> {
        let c = self.client().await?;
        let sql = "SELECT pg_notify($1, $2)";
        query(&c, sql, &[&fleet::BUS_CHANNEL, &payload])
            .await
            .map(drop)
    }

    fn subscribe(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<BusEvent>> {
        Some(self.bus.subscribe())
    }
}
