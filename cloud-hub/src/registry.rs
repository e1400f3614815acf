//! The fleet registry on disk: agents, enrolment tokens, published models and rollouts in an
//! embedded SQLite database.
//!
//! What must survive a hub restart lives here: every agent ever seen (site, software version,
//! models, enrolment, first and last contact) and the one-time enrolment tokens, stored only
//! as SHA-256 digests so a copy of the database does not hand out certificates. Live session
//! state (heartbeats, online or not) is kept in memory by [`crate::fleet`] and written here in
//! batches, so heartbeats from thousands of agents do not each cost a disk write. Times are
//! Unix milliseconds passed in by the caller.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use protocol::manifest::SignedManifest;
use ring::rand::SecureRandom;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// An agent as the registry remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRecord {
    /// Agent name (its certificate's common name).
    pub name: String,
    /// Site.
    pub site: String,
    /// Agent software version.
    pub agent_version: String,
    /// Models and versions, `name@version` joined by commas.
    pub models: String,
    /// When it enrolled with a token (Unix ms), if it did.
    pub enrolled_at: Option<i64>,
    /// First contact (Unix ms).
    pub first_seen: i64,
    /// Last heartbeat or hello (Unix ms).
    pub last_seen: i64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No such token was ever issued.
    #[error("unknown enrolment token")]
    Unknown,
    /// The token's time ran out.
    #[error("the enrolment token has expired")]
    Expired,
    /// The token was used already.
    #[error("the enrolment token was already used")]
    Used,
}

/// The registry database.
#[derive(Debug)]
pub struct Registry {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents (
    name          TEXT PRIMARY KEY,
    site          TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    models        TEXT NOT NULL,
    enrolled_at   INTEGER,
    first_seen    INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    digest     BLOB PRIMARY KEY,
    agent      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
);
CREATE TABLE IF NOT EXISTS models (
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    signed     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id         INTEGER PRIMARY KEY,
    model      TEXT NOT NULL,
    state      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
";

impl Registry {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Registry> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        // Several processes (the hub, `cloud-hub enroll`) share the file.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the schema in {}", path.display()))?;
        Ok(Registry {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves a connection that is still usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a one-time token that enrols `agent` until `expires_at`; returns the token.
    pub fn issue_token(&self, agent: &str, now: i64, expires_at: i64) -> anyhow::Result<String> {
        let mut raw = [0u8; 24];
        ring::rand::SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| anyhow::anyhow!("no randomness for the token"))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        self.conn().execute(
            "INSERT INTO tokens (digest, agent, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![digest(&token), agent, now, expires_at],
        )?;
        Ok(token)
    }

    /// Spends `token`: returns the agent it enrols, or why it cannot.
    pub fn redeem_token(
        &self,
        token: &str,
        now: i64,
    ) -> anyhow::Result<Result<String, TokenError>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let row: Option<(String, i64, Option<i64>)> = tx
            .query_row(
                "SELECT agent, expires_at, used_at FROM tokens WHERE digest = ?1",
                params![digest(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let verdict = match row {
            None => Err(TokenError::Unknown),
            Some((_, _, Some(_))) => Err(TokenError::Used),
            Some((_, expires, None)) if now >= expires => Err(TokenError::Expired),
            Some((agent, _, None)) => {
                tx.execute(
                    "UPDATE tokens SET used_at = ?1 WHERE digest = ?2",
                    params![now, digest(token)],
                )?;
                Ok(agent)
            }
        };
        tx.commit()?;
        Ok(verdict)
    }

    /// Records that `agent` enrolled at `now`.
    pub fn record_enrolment(&self, agent: &str, now: i64) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT INTO agents (name, site, agent_version, models, enrolled_at, first_seen, last_seen)
             VALUES (?1, '', '', '', ?2, ?2, ?2)
             ON CONFLICT(name) DO UPDATE SET enrolled_at = ?2",
            params![agent, now],
        )?;
        Ok(())
    }

    /// Writes the given agents' current records in one transaction.
    pub fn save(&self, agents: &[AgentRecord]) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO agents (name, site, agent_version, models, enrolled_at, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(name) DO UPDATE SET site = ?2, agent_version = ?3, models = ?4,
                     enrolled_at = COALESCE(agents.enrolled_at, ?5),
                     first_seen = MIN(agents.first_seen, ?6), last_seen = MAX(agents.last_seen, ?7)",
            )?;
            for a in agents {
                stmt.execute(params![
                    a.name,
                    a.site,
                    a.agent_version,
                    a.models,
                    a.enrolled_at,
                    a.first_seen,
                    a.last_seen
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a published model version; fails if `name` has this version or a newer one.
    pub fn add_model(&self, signed: &SignedManifest) -> anyhow::Result<()> {
        let m = &signed.manifest;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let newest: Option<u32> = tx.query_row(
            "SELECT MAX(version) FROM models WHERE name = ?1",
            params![m.name],
            |r| r.get(0),
        )?;
        if let Some(newest) = newest
            && newest >= m.version
        {
            anyhow::bail!(
                "{} v{} refused: v{newest} is published already (versions only rise)",
                m.name,
                m.version
            );
        }
        tx.execute(
            "INSERT INTO models (name, version, signed, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                m.name,
                m.version,
                serde_json::to_string(signed)?,
                m.created_at
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Published versions, of `name` or of every model, oldest first.
    pub fn models(&self, name: Option<&str>) -> anyhow::Result<Vec<SignedManifest>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT signed FROM models WHERE ?1 IS NULL OR name = ?1 ORDER BY name, version",
        )?;
        let rows = stmt
            .query_map(params![name], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.iter()
            .map(|j| serde_json::from_str(j).context("a stored manifest does not parse"))
            .collect()
    }

    /// One published version.
    pub fn model(&self, name: &str, version: u32) -> anyhow::Result<Option<SignedManifest>> {
        let conn = self.conn();
        let json: Option<String> = conn
            .query_row(
                "SELECT signed FROM models WHERE name = ?1 AND version = ?2",
                params![name, version],
                |r| r.get(0),
            )
            .optional()?;
        json.map(|j| serde_json::from_str(&j).context("a stored manifest does not parse"))
            .transpose()
    }

    /// Stores rollout `id`'s state (JSON).
    pub fn save_rollout(&self, id: u64, model: &str, state: &str, now: i64) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT INTO rollouts (id, model, state, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET state = ?3, updated_at = ?4",
            params![id as i64, model, state, now],
        )?;
        Ok(())
    }

    /// Every rollout's state (JSON), oldest first.
    pub fn rollouts(&self) -> anyhow::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT state FROM rollouts ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Every agent the registry knows, by name.
    pub fn agents(&self) -> anyhow::Result<Vec<AgentRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, site, agent_version, models, enrolled_at, first_seen, last_seen
             FROM agents ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(AgentRecord {
                name: r.get(0)?,
                site: r.get(1)?,
                agent_version: r.get(2)?,
                models: r.get(3)?,
                enrolled_at: r.get(4)?,
                first_seen: r.get(5)?,
                last_seen: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn digest(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes())
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_enrols_once_until_it_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(&dir.path().join("fleet.db")).expect("open");
        let token = reg.issue_token("gw-1", 1_000, 61_000).expect("token");
        assert_eq!(token.len(), 48);
        assert_eq!(
            reg.redeem_token("0000", 2_000).expect("db"),
            Err(TokenError::Unknown)
        );
        assert_eq!(
            reg.redeem_token(&token, 2_000).expect("db"),
            Ok("gw-1".into())
        );
        assert_eq!(
            reg.redeem_token(&token, 3_000).expect("db"),
            Err(TokenError::Used)
        );
        let late = reg.issue_token("gw-2", 1_000, 61_000).expect("token");
        assert_eq!(
            reg.redeem_token(&late, 61_000).expect("db"),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn agents_survive_reopening_and_keep_their_first_contact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fleet.db");
        let record = AgentRecord {
            name: "gw-1".into(),
            site: "plant-1".into(),
            agent_version: "0.1.0".into(),
            models: "bearing-cnn@1".into(),
            enrolled_at: None,
            first_seen: 5_000,
            last_seen: 9_000,
        };
        {
            let reg = Registry::open(&path).expect("open");
            reg.record_enrolment("gw-1", 4_000).expect("enrol");
            reg.save(std::slice::from_ref(&record)).expect("save");
        }
        let reg = Registry::open(&path).expect("reopen");
        let later = AgentRecord {
            first_seen: 20_000,
            last_seen: 21_000,
            ..record.clone()
        };
        reg.save(&[later]).expect("save again");
        let agents = reg.agents().expect("agents");
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].first_seen, 4_000);
        assert_eq!(agents[0].last_seen, 21_000);
        assert_eq!(agents[0].enrolled_at, Some(4_000));
        assert_eq!(agents[0].site, "plant-1");
    }
}
