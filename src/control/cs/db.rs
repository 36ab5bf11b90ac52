//! The CS's state in a database through sqlx's `Any` driver: an embedded SQLite file (the
//! default) or PostgreSQL (several CS instances behind a load balancer share one). One
//! schema, versioned migrations in `migrations/cs/` (portable SQL: TEXT and BIGINT,
//! `$n` placeholders). Every change is one transaction; writes are serialised (a
//! process-wide lock, plus `BEGIN IMMEDIATE` on SQLite and a transaction-scoped advisory
//! lock on PostgreSQL so that CS instances sharing a database do not interleave
//! read-modify-write sequences).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyConnection, AnyPool, Transaction};

use super::placement::{self, Candidate};
use super::{name_list, CsError};
use crate::control::api::{
    self, ApiError, AssignedMachine, Assignment, HealthLevel, Heartbeat, HeartbeatReply, MachineState, Migrate,
    Migrated, PsRegistration, Unregister, Unregistered,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/cs");

/// Seconds between one instance's deletions of expired request nonces.
const NONCE_PURGE_INTERVAL_S: i64 = 60;

/// Key of the PostgreSQL advisory lock that serialises writes across CS instances.
const PG_WRITE_LOCK: i64 = 0x6368_7572_6e6c_6f67; // "churnlog"

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A process server row.
#[derive(Debug, Clone)]
pub struct PsRow {
    pub id: String,
    pub address: String,
    pub cert_pem: String,
    pub version: String,
    pub cache_size_bytes: u64,
    pub registered_at: i64,
    pub last_heartbeat_at: Option<i64>,
    /// Heartbeats received so far: names the stored report (a new count, a new report).
    pub heartbeats: i64,
    pub decommissioning: bool,
}

/// A machine row (without its credential).
#[derive(Debug, Clone)]
pub struct MachineRow {
    pub name: String,
    pub ps_id: Option<String>,
    pub moving_to: Option<String>,
    pub resync_pending: bool,
}

/// Everything status needs, read in one transaction.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub process_servers: Vec<PsRow>,
    /// Each server's last report, by id (a server without one, or whose report this CS
    /// cannot parse because a newer one wrote it, is absent).
    pub reports: HashMap<String, Arc<Heartbeat>>,
    pub machines: Arc<Vec<MachineRow>>,
}

/// What [`Db::snapshot`] read last: the machine list with the generation it was read at,
/// and each server's parsed report with its heartbeat count. Status at fleet scale is
/// mostly these (20,000 machine rows, 100 reports); a snapshot re-reads only what changed.
#[derive(Default)]
struct StatusCache {
    machines: Option<(i64, Arc<Vec<MachineRow>>)>,
    reports: HashMap<String, (i64, Option<Arc<Heartbeat>>)>,
}

pub struct Db {
    pool: AnyPool,
    backend: Backend,
    write_lock: tokio::sync::Mutex<()>,
    /// Heartbeat age beyond which a process server counts as disconnected.
    timeout_ms: i64,
    status_cache: parking_lot::Mutex<StatusCache>,
    /// When (Unix seconds) this instance last deleted expired request nonces.
    nonces_purged_at: AtomicI64,
}

/// The connection URL for `--db`: a `postgres://` or `sqlite:` URL as given, anything
/// else a SQLite file (created if missing).
pub fn database_url(spec: &str) -> (String, Backend) {
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        (spec.to_string(), Backend::Postgres)
    } else if spec.starts_with("sqlite:") {
        (spec.to_string(), Backend::Sqlite)
    } else {
        (format!("sqlite://{spec}?mode=rwc"), Backend::Sqlite)
    }
}

fn health_of(s: &str) -> HealthLevel {
    match s {
        "critical" => HealthLevel::Critical,
        "warning" => HealthLevel::Warning,
        _ => HealthLevel::Ok,
    }
}

fn health_str(h: HealthLevel) -> &'static str {
    match h {
        HealthLevel::Ok => "ok",
        HealthLevel::Warning => "warning",
        HealthLevel::Critical => "critical",
    }
}

fn not_found_ps(id: &str) -> ApiError {
    ApiError::new("not_found", format!("process server {id:?} is not registered with this configuration server"))
}

fn not_found_machine(name: &str) -> ApiError {
    ApiError::new("not_found", format!("machine {name:?} is not registered with this configuration server"))
}

/// i64 columns hold u64 figures; a figure beyond i64 is clamped (no cache is 8 EiB).
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

type PsTuple = (String, String, String, String, i64, i64, Option<i64>, i64, i64);
const PS_COLUMNS: &str = "id, address, cert_pem, version, cache_size_bytes, registered_at, last_heartbeat_at, \
                          heartbeats, decommissioning";

fn ps_row(t: PsTuple) -> PsRow {
    PsRow {
        id: t.0,
        address: t.1,
        cert_pem: t.2,
        version: t.3,
        cache_size_bytes: t.4.max(0) as u64,
        registered_at: t.5,
        last_heartbeat_at: t.6,
        heartbeats: t.7,
        decommissioning: t.8 != 0,
    }
}

impl Db {
    /// Connects (creating a SQLite file if missing) and applies pending migrations.
    pub async fn open(spec: &str, heartbeat_timeout: Duration) -> Result<Db, CsError> {
        sqlx::any::install_default_drivers();
        let (url, backend) = database_url(spec);
        let options = AnyPoolOptions::new()
            // SQLite writes one at a time anyway; a few readers are plenty for status.
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: status reads never wait for a heartbeat's write; the busy
                        // timeout covers another process (a second CS on the same file).
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            });
        let pool = options.connect(&url).await?;
        MIGRATOR.run(&pool).await?;
        Ok(Db {
            pool,
            backend,
            write_lock: tokio::sync::Mutex::new(()),
            timeout_ms: heartbeat_timeout.as_millis().min(i64::MAX as u128) as i64,
            status_cache: parking_lot::Mutex::new(StatusCache::default()),
            nonces_purged_at: AtomicI64::new(0),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn heartbeat_timeout_ms(&self) -> i64 {
        self.timeout_ms
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Whether a server whose last heartbeat was at `last` counts as connected at `now`.
    pub fn connected(&self, last: Option<i64>, now: i64) -> bool {
        last.is_some_and(|t| now.saturating_sub(t) < self.timeout_ms)
    }

    /// A write transaction, serialised with every other writer.
    async fn write(&self) -> Result<(tokio::sync::MutexGuard<'_, ()>, Transaction<'static, Any>), CsError> {
        let guard = self.write_lock.lock().await;
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                // COUNT(*) around it: `Any` cannot decode the function's `void` result.
                sqlx::query("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock($1)) AS l")
                    .bind(PG_WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        };
        Ok((guard, tx))
    }

    /// Records a signed request's nonce for every CS instance sharing this database,
    /// until `expires_at` (Unix seconds); false when one of them recorded it before (a
    /// replay). Expired nonces are deleted at most once a minute per instance.
    pub async fn remember_nonce(&self, nonce: &str, expires_at: u64, now_s: u64) -> Result<bool, CsError> {
        // SQLite has one writer at a time: queue behind this instance's writers instead of
        // spinning in SQLite's busy handler. PostgreSQL's unique index settles races alone.
        let _serialised = match self.backend {
            Backend::Sqlite => Some(self.write_lock.lock().await),
            Backend::Postgres => None,
        };
        let now_s = to_i64(now_s);
        let last = self.nonces_purged_at.load(Ordering::Relaxed);
        if now_s.saturating_sub(last) >= NONCE_PURGE_INTERVAL_S
            && self.nonces_purged_at.compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            // A failed clean-up only leaves rows for the next one.
            let purged =
                sqlx::query("DELETE FROM request_nonces WHERE expires_at < $1").bind(now_s).execute(&self.pool);
            if let Err(e) = purged.await {
                tracing::warn!(error = %e, "expired request nonces not deleted; retrying in a minute");
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO request_nonces (nonce, expires_at) VALUES ($1, $2) ON CONFLICT (nonce) DO NOTHING",
        )
        .bind(nonce)
        .bind(to_i64(expires_at))
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn ps(conn: &mut AnyConnection, id: &str) -> Result<Option<PsRow>, CsError> {
        let sql = format!("SELECT {PS_COLUMNS} FROM process_servers WHERE id = $1");
        let row: Option<PsTuple> = sqlx::query_as(&sql).bind(id).fetch_optional(&mut *conn).await?;
        Ok(row.map(ps_row))
    }

    /// Every process server with its placement inputs and machine count.
    async fn candidates(&self, conn: &mut AnyConnection, now: i64) -> Result<Vec<Candidate>, CsError> {
        let rows: Vec<(String, Option<i64>, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT id, last_heartbeat_at, health, ingest_bytes_per_second, cache_free_ppm, decommissioning \
             FROM process_servers ORDER BY id",
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut counts: HashMap<String, i64> = HashMap::new();
        // Two grouped counts (each served by an index) rather than a correlated subquery
        // per server: this runs on every registration.
        for sql in [
            "SELECT ps_id, COUNT(*) FROM machines WHERE ps_id IS NOT NULL GROUP BY ps_id",
            "SELECT moving_to, COUNT(*) FROM machines WHERE moving_to IS NOT NULL GROUP BY moving_to",
        ] {
            let c: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(&mut *conn).await?;
            for (id, n) in c {
                *counts.entry(id).or_default() += n;
            }
        }
        Ok(rows
            .into_iter()
            .map(|(id, last, health, ingest, free, decom)| Candidate {
                connected: self.connected(last, now),
                health: health_of(&health),
                decommissioning: decom != 0,
                ingest_bytes_per_second: ingest.max(0) as u64,
                cache_free_ppm: free.max(0) as u64,
                machines: counts.get(&id).copied().unwrap_or(0).max(0) as u64,
                id,
            })
            .collect())
    }

    /// Registers or re-registers a process server (the version rule is the caller's).
    pub async fn register_ps(&self, reg: &PsRegistration, now: i64) -> Result<(), CsError> {
        let (_g, mut tx) = self.write().await?;
        let exists = Self::ps(&mut tx, &reg.id).await?.is_some();
        let sql = if exists {
            "UPDATE process_servers SET address = $2, cert_pem = $3, version = $4, cache_size_bytes = $5 WHERE id = $1"
        } else {
            "INSERT INTO process_servers (id, address, cert_pem, version, cache_size_bytes, registered_at) \
             VALUES ($1, $2, $3, $4, $5, $6)"
        };
        let mut q = sqlx::query(sql)
            .bind(&reg.id)
            .bind(&reg.address)
            .bind(&reg.cert_pem)
            .bind(&reg.version)
            .bind(to_i64(reg.cache_size_bytes));
        if !exists {
            q = q.bind(now);
        }
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a heartbeat, hands released machines on, clears applied resyncs, and
    /// returns the machines the server holds.
    pub async fn heartbeat(&self, hb: &Heartbeat, now: i64) -> Result<HeartbeatReply, CsError> {
        let report = serde_json::to_string(hb).map_err(|e| CsError::Corrupt(e.to_string()))?;
        let (_g, mut tx) = self.write().await?;
        let ps = Self::ps(&mut tx, &hb.id).await?.ok_or_else(|| {
            ApiError::new(
                "not_found",
                format!("process server {:?} is not registered: register it first (`churnlog ps register`)", hb.id),
            )
        })?;
        let free_ppm = (hb.cache_free_percent.clamp(0.0, 100.0) * 10_000.0).round() as i64;
        sqlx::query(
            "UPDATE process_servers SET last_heartbeat_at = $2, report_json = $3, health = $4, \
             ingest_bytes_per_second = $5, cache_free_ppm = $6, heartbeats = heartbeats + 1 WHERE id = $1",
        )
        .bind(&hb.id)
        .bind(now)
        .bind(&report)
        .bind(health_str(hb.health))
        .bind(hb.ingest_bytes_per_second.max(0.0).min(i64::MAX as f64) as i64)
        .bind(free_ppm)
        .execute(&mut *tx)
        .await?;
        for name in &hb.released {
            let done = sqlx::query(
                "UPDATE machines SET ps_id = moving_to, moving_to = NULL \
                 WHERE name = $1 AND ps_id = $2 AND moving_to IS NOT NULL",
            )
            .bind(name)
            .bind(&hb.id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                tracing::info!(machine = %name, from = %hb.id, "machine released; it continues on its new process server");
            }
        }
        for name in &hb.resync_applied {
            sqlx::query("UPDATE machines SET resync_pending = 0 WHERE name = $1 AND ps_id = $2")
                .bind(name)
                .bind(&hb.id)
                .execute(&mut *tx)
                .await?;
        }
        // A machine whose credential an operator cleared (reassign) is left out of
        // `machines` (nobody may log in as it until it registers again) but stays owned:
        // what the server caches for it is still uploaded.
        let rows: Vec<(String, Option<String>, Option<String>, i64)> = sqlx::query_as(
            "SELECT name, credential, moving_to, resync_pending FROM machines WHERE ps_id = $1 ORDER BY name",
        )
        .bind(&hb.id)
        .fetch_all(&mut *tx)
        .await?;
        let owned: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        if !hb.released.is_empty() || !hb.resync_applied.is_empty() {
            Self::machines_changed(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(HeartbeatReply {
            owned: Some(owned),
            machines: rows
                .into_iter()
                .filter_map(|(name, credential, moving_to, resync)| Some((name, credential?, moving_to, resync)))
                .map(|(name, credential, moving_to, resync)| AssignedMachine {
                    name,
                    credential,
                    state: if moving_to.is_some() { MachineState::MovingAway } else { MachineState::Active },
                    resync_required: resync != 0,
                })
                .collect(),
            decommissioning: ps.decommissioning,
        })
    }

    /// Registers a machine with a fresh credential and places it; `conflict` when the
    /// name holds a credential already. Returns the server it went to (None: none could).
    pub async fn register_machine(&self, name: &str, credential: &str, now: i64) -> Result<Option<String>, CsError> {
        api::check_name("machine name", name)?;
        let (_g, mut tx) = self.write().await?;
        let existing: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT credential, ps_id FROM machines WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let ps = match existing {
            Some((Some(_), _)) => {
                return Err(ApiError::new(
                    "conflict",
                    format!(
                        "machine name {name:?} is registered to another machine; an operator can release it with \
                         `churnlog cs reassign --machine {name}`"
                    ),
                )
                .into())
            }
            // Released by an operator: the new holder continues where the name is.
            Some((None, Some(ps))) => {
                sqlx::query("UPDATE machines SET credential = $2 WHERE name = $1")
                    .bind(name)
                    .bind(credential)
                    .execute(&mut *tx)
                    .await?;
                Some(ps)
            }
            Some((None, None)) | None => {
                let cands = self.candidates(&mut tx, now).await?;
                let ps = placement::least_loaded(&cands, None).map(|i| cands[i].id.clone());
                if existing.is_some() {
                    sqlx::query("UPDATE machines SET credential = $2, ps_id = $3 WHERE name = $1")
                        .bind(name)
                        .bind(credential)
                        .bind(ps.clone())
                        .execute(&mut *tx)
                        .await?;
                } else {
                    sqlx::query(
                        "INSERT INTO machines (name, credential, ps_id, registered_at) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(name)
                    .bind(credential)
                    .bind(ps.clone())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                ps
            }
        };
        Self::machines_changed(&mut tx).await?;
        tx.commit().await?;
        Ok(ps)
    }

    /// A machine's credential (hex), None when unknown or released.
    pub async fn machine_credential(&self, name: &str) -> Result<Option<String>, CsError> {
        let row: Option<(Option<String>,)> = sqlx::query_as("SELECT credential FROM machines WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// Where a machine replicates; a machine without a server is placed now if one can
    /// take it.
    pub async fn assignment(&self, name: &str, now: i64) -> Result<Assignment, CsError> {
        let (_g, mut tx) = self.write().await?;
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT ps_id, moving_to FROM machines WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let (ps_id, moving_to) = row.ok_or_else(|| not_found_machine(name))?;
        if let Some(to) = moving_to {
            return Err(ApiError::new(
                "unavailable",
                format!(
                    "machine {name:?} is moving from {} to {to}; ask again shortly",
                    ps_id.as_deref().unwrap_or("(none)")
                ),
            )
            .into());
        }
        let ps_id = match ps_id {
            Some(p) => p,
            None => {
                let cands = self.candidates(&mut tx, now).await?;
                let Some(i) = placement::least_loaded(&cands, None) else {
                    return Err(ApiError::new(
                        "unavailable",
                        format!("no process server can take machine {name:?} now (none connected and healthy); ask again shortly"),
                    )
                    .into());
                };
                let id = cands[i].id.clone();
                sqlx::query("UPDATE machines SET ps_id = $2 WHERE name = $1")
                    .bind(name)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                Self::machines_changed(&mut tx).await?;
                id
            }
        };
        let ps = Self::ps(&mut tx, &ps_id)
            .await?
            .ok_or_else(|| CsError::Corrupt(format!("machine {name} on unknown server {ps_id}")))?;
        tx.commit().await?;
        Ok(Assignment { ps: ps.id, address: ps.address, cert_pem: ps.cert_pem })
    }

    /// Clears a machine's credential so that a (new) machine may register the name.
    pub async fn reassign(&self, name: &str) -> Result<(), CsError> {
        let (_g, mut tx) = self.write().await?;
        let done =
            sqlx::query("UPDATE machines SET credential = NULL WHERE name = $1").bind(name).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(not_found_machine(name).into());
        }
        Self::machines_changed(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Starts moving one machine, or every machine of a server, to `to`.
    pub async fn migrate(&self, m: &Migrate, now: i64) -> Result<Migrated, CsError> {
        let (_g, mut tx) = self.write().await?;
        let to = Self::ps(&mut tx, &m.to).await?.ok_or_else(|| not_found_ps(&m.to))?;
        if !self.connected(to.last_heartbeat_at, now) {
            return Err(ApiError::new(
                "unavailable",
                format!("process server {:?} is disconnected: it cannot take machines", m.to),
            )
            .into());
        }
        if to.decommissioning {
            return Err(ApiError::new(
                "conflict",
                format!("process server {:?} is being decommissioned: it takes no machines", m.to),
            )
            .into());
        }
        let check_source = |from: &PsRow| -> Result<(), CsError> {
            if !self.connected(from.last_heartbeat_at, now) {
                return Err(ApiError::new(
                    "conflict",
                    format!(
                        "process server {:?} is disconnected, so its cached data cannot drain for a move: purge it \
                         instead (`churnlog cs unregister --ps {} --purge`)",
                        from.id, from.id
                    ),
                )
                .into());
            }
            Ok(())
        };
        let moved: Vec<String> = match (&m.machine, &m.all_from) {
            (Some(name), None) => {
                let row: Option<(Option<String>, Option<String>)> =
                    sqlx::query_as("SELECT ps_id, moving_to FROM machines WHERE name = $1")
                        .bind(name)
                        .fetch_optional(&mut *tx)
                        .await?;
                let (ps_id, moving_to) = row.ok_or_else(|| not_found_machine(name))?;
                if let Some(t) = moving_to {
                    return Err(ApiError::new("conflict", format!("machine {name:?} is already moving to {t}")).into());
                }
                match ps_id {
                    Some(p) if p == m.to => {
                        return Err(ApiError::new("conflict", format!("machine {name:?} is already on {p}")).into())
                    }
                    Some(p) => {
                        let from = Self::ps(&mut tx, &p).await?.ok_or_else(|| not_found_ps(&p))?;
                        check_source(&from)?;
                        sqlx::query("UPDATE machines SET moving_to = $2 WHERE name = $1")
                            .bind(name)
                            .bind(&m.to)
                            .execute(&mut *tx)
                            .await?;
                    }
                    // Nothing cached anywhere: it simply goes there.
                    None => {
                        sqlx::query("UPDATE machines SET ps_id = $2 WHERE name = $1")
                            .bind(name)
                            .bind(&m.to)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                vec![name.clone()]
            }
            (None, Some(from_id)) => {
                if *from_id == m.to {
                    return Err(ApiError::bad_request("--from and --to name the same process server").into());
                }
                let from = Self::ps(&mut tx, from_id).await?.ok_or_else(|| not_found_ps(from_id))?;
                check_source(&from)?;
                let names: Vec<(String,)> =
                    sqlx::query_as("SELECT name FROM machines WHERE ps_id = $1 AND moving_to IS NULL ORDER BY name")
                        .bind(from_id)
                        .fetch_all(&mut *tx)
                        .await?;
                sqlx::query("UPDATE machines SET moving_to = $2 WHERE ps_id = $1 AND moving_to IS NULL")
                    .bind(from_id)
                    .bind(&m.to)
                    .execute(&mut *tx)
                    .await?;
                names.into_iter().map(|n| n.0).collect()
            }
            _ => {
                return Err(
                    ApiError::bad_request("migrate takes either a machine or all_from, not both or neither").into()
                )
            }
        };
        Self::machines_changed(&mut tx).await?;
        tx.commit().await?;
        Ok(Migrated { machines: moved })
    }

    /// Marks a server decommissioning and starts moving each of its machines to the
    /// least loaded other eligible server; nothing changes when some cannot move.
    pub async fn decommission(&self, id: &str, now: i64) -> Result<Migrated, CsError> {
        let (_g, mut tx) = self.write().await?;
        let ps = Self::ps(&mut tx, id).await?.ok_or_else(|| not_found_ps(id))?;
        let names: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM machines WHERE ps_id = $1 AND moving_to IS NULL ORDER BY name")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        let names: Vec<String> = names.into_iter().map(|n| n.0).collect();
        if !names.is_empty() && !self.connected(ps.last_heartbeat_at, now) {
            return Err(ApiError::new(
                "conflict",
                format!(
                    "process server {id:?} is disconnected, so its cached data cannot drain: purge it instead \
                     (`churnlog cs unregister --ps {id} --purge`)"
                ),
            )
            .into());
        }
        let mut cands = self.candidates(&mut tx, now).await?;
        let targets = placement::place_many(&mut cands, Some(id), names.len());
        let stuck: Vec<String> =
            names.iter().zip(&targets).filter(|(_, t)| t.is_none()).map(|(n, _)| n.clone()).collect();
        if !stuck.is_empty() {
            return Err(ApiError::new(
                "unavailable",
                format!(
                    "no other process server can take {}: register or reconnect one, then decommission {id} again",
                    name_list(&stuck)
                ),
            )
            .into());
        }
        sqlx::query("UPDATE process_servers SET decommissioning = 1 WHERE id = $1").bind(id).execute(&mut *tx).await?;
        for (name, to) in names.iter().zip(targets) {
            sqlx::query("UPDATE machines SET moving_to = $2 WHERE name = $1")
                .bind(name)
                .bind(to)
                .execute(&mut *tx)
                .await?;
        }
        Self::machines_changed(&mut tx).await?;
        tx.commit().await?;
        Ok(Migrated { machines: names })
    }

    /// Removes a server: without purge only one with no machines; with purge also a
    /// disconnected one, whose machines go to other servers and are marked resync-required.
    pub async fn unregister(&self, u: &Unregister, now: i64) -> Result<Unregistered, CsError> {
        let (_g, mut tx) = self.write().await?;
        let ps = Self::ps(&mut tx, &u.ps).await?.ok_or_else(|| not_found_ps(&u.ps))?;
        let names: Vec<(String,)> = sqlx::query_as("SELECT name FROM machines WHERE ps_id = $1 ORDER BY name")
            .bind(&u.ps)
            .fetch_all(&mut *tx)
            .await?;
        let names: Vec<String> = names.into_iter().map(|n| n.0).collect();
        let mut reply = Unregistered { moved: Vec::new(), resync_required: Vec::new() };
        if !names.is_empty() {
            if !u.purge {
                return Err(ApiError::new(
                    "conflict",
                    format!(
                        "process server {:?} still has machines ({}): decommission it (`churnlog ps decommission`) \
                         or migrate them first; purge only a server that is gone",
                        u.ps,
                        name_list(&names)
                    ),
                )
                .into());
            }
            if self.connected(ps.last_heartbeat_at, now) && !u.force {
                return Err(ApiError::new(
                    "conflict",
                    format!(
                        "process server {:?} is connected and has machines ({}): decommission it instead, so that \
                         nothing cached is lost",
                        u.ps,
                        name_list(&names)
                    ),
                )
                .into());
            }
            let mut cands = self.candidates(&mut tx, now).await?;
            let targets = placement::place_many(&mut cands, Some(&u.ps), names.len());
            for (name, to) in names.iter().zip(targets) {
                // What the purged server had cached is lost: the disks resync.
                sqlx::query("UPDATE machines SET ps_id = $2, moving_to = NULL, resync_pending = 1 WHERE name = $1")
                    .bind(name)
                    .bind(to.clone())
                    .execute(&mut *tx)
                    .await?;
                if let Some(to) = to {
                    reply.moved.push((name.clone(), to));
                }
                reply.resync_required.push(name.clone());
            }
        }
        // Machines that were moving onto it stay where they are.
        sqlx::query("UPDATE machines SET moving_to = NULL WHERE moving_to = $1").bind(&u.ps).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM process_servers WHERE id = $1").bind(&u.ps).execute(&mut *tx).await?;
        Self::machines_changed(&mut tx).await?;
        tx.commit().await?;
        Ok(reply)
    }

    /// Every process server and machine, consistently.
    pub async fn snapshot(&self) -> Result<Snapshot, CsError> {
        let mut tx = self.pool.begin().await?;
        let sql = format!("SELECT {PS_COLUMNS} FROM process_servers ORDER BY id");
        let ps: Vec<PsRow> = sqlx::query_as(&sql).fetch_all(&mut *tx).await?.into_iter().map(ps_row).collect();
        // Reports: parse again only those with a heartbeat since the last snapshot.
        let mut reports = HashMap::with_capacity(ps.len());
        let mut fresh: Vec<(String, i64)> = Vec::new();
        {
            let cache = self.status_cache.lock();
            for row in &ps {
                match cache.reports.get(&row.id) {
                    Some((count, report)) if *count == row.heartbeats => {
                        if let Some(r) = report {
                            reports.insert(row.id.clone(), r.clone());
                        }
                    }
                    _ => fresh.push((row.id.clone(), row.heartbeats)),
                }
            }
        }
        let mut parsed = Vec::with_capacity(fresh.len());
        for (id, _) in fresh {
            // Keyed by the count read with the report: on PostgreSQL (read committed) a
            // heartbeat may have landed since the row above was read.
            let row: Option<(i64, Option<String>)> =
                sqlx::query_as("SELECT heartbeats, report_json FROM process_servers WHERE id = $1")
                    .bind(&id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some((count, json)) = row else { continue };
            // A report this CS cannot parse (written by a newer one) counts as no report.
            let report = json.and_then(|j| serde_json::from_str::<Heartbeat>(&j).ok()).map(Arc::new);
            parsed.push((id, count, report));
        }
        let generation: (i64,) =
            sqlx::query_as("SELECT value FROM generations WHERE name = 'machines'").fetch_one(&mut *tx).await?;
        let cached = self.status_cache.lock().machines.clone().filter(|(g, _)| *g == generation.0);
        let machines = match cached {
            Some((_, m)) => m,
            None => {
                let rows: Vec<(String, Option<String>, Option<String>, i64)> =
                    sqlx::query_as("SELECT name, ps_id, moving_to, resync_pending FROM machines ORDER BY name")
                        .fetch_all(&mut *tx)
                        .await?;
                Arc::new(
                    rows.into_iter()
                        .map(|(name, ps_id, moving_to, r)| MachineRow {
                            name,
                            ps_id,
                            moving_to,
                            resync_pending: r != 0,
                        })
                        .collect(),
                )
            }
        };
        tx.commit().await?;
        let mut cache = self.status_cache.lock();
        cache.machines = Some((generation.0, machines.clone()));
        for (id, count, report) in parsed {
            if let Some(r) = &report {
                reports.insert(id.clone(), r.clone());
            }
            cache.reports.insert(id, (count, report));
        }
        // Forget servers that are gone.
        cache.reports.retain(|id, _| ps.iter().any(|p| &p.id == id));
        Ok(Snapshot { process_servers: ps, reports, machines })
    }

    /// Marks the machine list changed (see migrations/cs/0002): every transaction that
    /// changes a row of `machines` calls this before it commits.
    async fn machines_changed(tx: &mut Transaction<'static, Any>) -> Result<(), CsError> {
        sqlx::query("UPDATE generations SET value = value + 1 WHERE name = 'machines'").execute(&mut **tx).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::api::MachineReport;

    fn reg(id: &str) -> PsRegistration {
        PsRegistration {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            cert_pem: String::new(),
            version: crate::control::VERSION.into(),
            cache_size_bytes: 1 << 30,
        }
    }

    fn beat(id: &str, machines: &[(&str, f64)]) -> Heartbeat {
        Heartbeat {
            id: id.into(),
            cache_free_percent: 90.0,
            machines: machines
                .iter()
                .map(|(n, rpo)| MachineReport { name: n.to_string(), rpo_seconds: Some(*rpo), ..Default::default() })
                .collect(),
            ..Default::default()
        }
    }

    /// The snapshot cache never serves what another CS instance sharing the database
    /// changed: machine moves and new reports written through a second `Db` show up in
    /// the first one's next snapshot, and unchanged parts are served from its cache.
    #[tokio::test]
    async fn snapshots_follow_changes_made_by_another_instance() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cs.db");
        let spec = file.to_str().unwrap();
        let a = Db::open(spec, Duration::from_secs(900)).await.unwrap();
        let b = Db::open(spec, Duration::from_secs(900)).await.unwrap();
        let now = super::super::now_ms();
        for ps in ["ps1", "ps2"] {
            a.register_ps(&reg(ps), now).await.unwrap();
            a.heartbeat(&beat(ps, &[]), now).await.unwrap();
        }
        a.register_machine("m1", "00", now).await.unwrap();
        let on = a.assignment("m1", now).await.unwrap().ps;
        let other = if on == "ps1" { "ps2" } else { "ps1" };
        a.heartbeat(&beat(&on, &[("m1", 5.0)]), now).await.unwrap();
        let first = a.snapshot().await.unwrap();
        assert_eq!(first.machines.len(), 1);
        assert_eq!(first.machines[0].ps_id.as_deref(), Some(on.as_str()));
        assert_eq!(first.reports[&on].machines[0].rpo_seconds, Some(5.0));

        // Nothing changed: the same machine list and report are served again.
        let again = a.snapshot().await.unwrap();
        assert!(Arc::ptr_eq(&first.machines, &again.machines));
        assert!(Arc::ptr_eq(&first.reports[&on], &again.reports[&on]));

        // The other instance moves the machine, registers another and stores a report.
        b.migrate(&Migrate { machine: Some("m1".into()), all_from: None, to: other.to_string() }, now).await.unwrap();
        b.register_machine("m2", "00", now).await.unwrap();
        b.heartbeat(&beat(&on, &[("m1", 9.0)]), now + 1).await.unwrap();
        let later = a.snapshot().await.unwrap();
        assert!(!Arc::ptr_eq(&first.machines, &later.machines));
        assert_eq!(later.machines.len(), 2);
        assert_eq!(later.machines[0].moving_to.as_deref(), Some(other));
        assert_eq!(later.reports[&on].machines[0].rpo_seconds, Some(9.0));
        // The report of the server without a new heartbeat is still the cached one.
        assert!(Arc::ptr_eq(&first.reports[other], &later.reports[other]));

        // A released machine (a heartbeat that changes `machines`) shows on its new server.
        let mut released = beat(&on, &[]);
        released.released = vec!["m1".into()];
        b.heartbeat(&released, now + 2).await.unwrap();
        let after = a.snapshot().await.unwrap();
        assert_eq!(after.machines[0].ps_id.as_deref(), Some(other));
        assert_eq!(after.machines[0].moving_to, None);
        assert!(after.reports[&on].machines.is_empty());
        a.close().await;
        b.close().await;
    }

    /// A nonce recorded through one instance is a replay to every instance on the
    /// database; it is forgotten only after it expires (and then only by a purge).
    #[tokio::test]
    async fn a_nonce_is_accepted_once_across_instances_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cs.db");
        let spec = file.to_str().unwrap();
        let a = Db::open(spec, Duration::from_secs(900)).await.unwrap();
        let b = Db::open(spec, Duration::from_secs(900)).await.unwrap();
        let now = 1_000_000;
        // Each instance's first call purges (at `now`); the next purge is due a minute later.
        assert!(a.remember_nonce("n1", now + 600, now).await.unwrap());
        assert!(!a.remember_nonce("n1", now + 600, now).await.unwrap(), "replayed to the same instance");
        assert!(!b.remember_nonce("n1", now + 600, now).await.unwrap(), "replayed to another instance");
        assert!(b.remember_nonce("n0", now + 10, now).await.unwrap());
        // n0 has expired, but within both instances' purge interval nothing is deleted.
        assert!(!a.remember_nonce("n0", now + 610, now + 30).await.unwrap());
        assert!(!b.remember_nonce("n0", now + 610, now + 59).await.unwrap());
        // a's next purge deletes n0 (expired) and keeps n1 (not yet).
        assert!(a.remember_nonce("n2", now + 700, now + 61).await.unwrap());
        assert!(b.remember_nonce("n0", now + 700, now + 61).await.unwrap(), "expired and purged");
        assert!(!b.remember_nonce("n1", now + 700, now + 61).await.unwrap(), "not expired: kept");
        let rows: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM request_nonces").fetch_one(&a.pool).await.unwrap();
        assert_eq!(rows.0, 3, "n1, n2 and n0 again");
        a.close().await;
        b.close().await;
    }
}
