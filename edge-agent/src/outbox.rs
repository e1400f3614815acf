//! The on-disk outbox: result messages the broker cannot take now, kept in a file until it can.
//!
//! While the agent is disconnected from the broker and its MQTT client holds all it may, the
//! publisher appends each result message here instead of waiting, so the workers keep serving
//! the queue; once connected again it empties the outbox, oldest first, before it publishes
//! anything new. At a stop the broker did not acknowledge in full, what the MQTT client still
//! holds is appended too, and the next start publishes it. The file is a `queue-file` FIFO
//! (each append and removal atomic, every record checksummed). Appends are not synced one by
//! one, which a gateway's flash would pay for per result: [`Outbox::sync_if_due`] syncs at
//! most once a second while it fills, and a stop syncs, so a power cut loses at most the last
//! second's appends. The used part of the file (an 8 KiB header and the records) is bounded by
//! `mqtt.outbox_max_bytes`; past it, a message is refused and the caller counts it. The file
//! grows by doubling, so on disk it may take up to twice that.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use queue_file::QueueFile;

/// How often appends are synced while the outbox fills.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

/// One result message: where it goes and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The MQTT topic.
    pub topic: String,
    /// The payload, as published.
    pub payload: Vec<u8>,
    /// How many results it carries (a batch carries several).
    pub results: u32,
}

/// What can go wrong with the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The file could not be opened, read or written.
    #[error("outbox {path:?}: {source}")]
    File {
        /// The outbox file.
        path: PathBuf,
        /// What the file layer said.
        source: queue_file::Error,
    },
    /// A record read back is not a message this agent wrote.
    #[error("outbox record unreadable: {0}")]
    Record(&'static str),
}

/// Encodes a message as one outbox record: results (u32), topic length (u16), both big
/// endian, the topic, then the payload.
pub fn encode(message: &Message) -> Vec<u8> {
    let topic = message.topic.as_bytes();
    let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
    let topic = &topic[..usize::from(topic_len)];
    let mut record = Vec::with_capacity(6 + topic.len() + message.payload.len());
    record.extend_from_slice(&message.results.to_be_bytes());
    record.extend_from_slice(&topic_len.to_be_bytes());
    record.extend_from_slice(topic);
    record.extend_from_slice(&message.payload);
    record
}

/// Decodes a record written by [`encode`].
pub fn decode(record: &[u8]) -> Result<Message, OutboxError> {
    let (results, rest) = record
        .split_first_chunk::<4>()
        .ok_or(OutboxError::Record("shorter than its header"))?;
    let (topic_len, rest) = rest
        .split_first_chunk::<2>()
        .ok_or(OutboxError::Record("shorter than its header"))?;
    let topic_len = usize::from(u16::from_be_bytes(*topic_len));
    if rest.len() < topic_len {
        return Err(OutboxError::Record("shorter than its topic"));
    }
    let (topic, payload) = rest.split_at(topic_len);
    let topic = std::str::from_utf8(topic).map_err(|_| OutboxError::Record("topic not UTF-8"))?;
    if topic.is_empty() {
        return Err(OutboxError::Record("empty topic"));
    }
    Ok(Message {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        results: u32::from_be_bytes(*results),
    })
}

/// The outbox file.
pub struct Outbox {
    path: PathBuf,
    file: QueueFile,
    max_bytes: u64,
    /// When the first append not yet synced was made.
    unsynced_since: Option<Instant>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .field("messages", &self.file.size())
            .finish()
    }
}

impl Outbox {
    /// Opens the outbox at `path`, creating it if needed. A file that is not an outbox, or
    /// is damaged beyond reading, is moved aside to `<path>.bad` and a new one started; the
    /// second value then says why.
    pub fn open(path: &Path, max_bytes: u64) -> Result<(Outbox, Option<String>), OutboxError> {
        let file_error = |source| OutboxError::File {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| file_error(e.into()))?;
        }
        let (file, set_aside) = match QueueFile::open(path) {
            Ok(file) => (file, None),
            Err(queue_file::Error::Io { source }) => return Err(file_error(source.into())),
            Err(damaged) => {
                let bad = path.with_extension("bad");
                std::fs::rename(path, &bad).map_err(|e| file_error(e.into()))?;
                let file = QueueFile::open(path).map_err(file_error)?;
                (file, Some(format!("{damaged}; moved to {bad:?}")))
            }
        };
        let mut outbox = Outbox {
            path: path.to_owned(),
            file,
            max_bytes,
            unsynced_since: None,
        };
        outbox.file.set_sync_writes(false);
        Ok((outbox, set_aside))
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.file.size()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.file.is_empty()
    }

    /// Appends `message`; `Ok(false)` when it would take the file's used size (its 8 KiB
    /// header included) past the bound.
    pub fn push(&mut self, message: &Message, now: Instant) -> Result<bool, OutboxError> {
        let record = encode(message);
        if self.file.used_bytes() + record.len() as u64 > self.max_bytes {
            return Ok(false);
        }
        self.file.add(&record).map_err(|e| self.file_error(e))?;
        self.unsynced_since.get_or_insert(now);
        Ok(true)
    }

    /// The oldest message, without removing it. An unreadable record is an error; the
    /// caller removes it with [`Outbox::pop`] and counts it.
    pub fn peek(&self) -> Result<Option<Message>, OutboxError> {
        match self.file.peek().map_err(|e| self.file_error(e))? {
            Some(record) => decode(&record).map(Some),
            None => Ok(None),
        }
    }

    /// Removes the oldest message.
    pub fn pop(&mut self) -> Result<(), OutboxError> {
        self.file.remove().map_err(|e| self.file_error(e))
    }

    /// Syncs the appends of the last [`SYNC_EVERY`] or more.
    pub fn sync_if_due(&mut self, now: Instant) -> Result<(), OutboxError> {
        match self.unsynced_since {
            Some(since) if now.saturating_duration_since(since) >= SYNC_EVERY => self.sync(),
            _ => Ok(()),
        }
    }

    /// Syncs every append so far.
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        self.file.sync_all().map_err(|e| self.file_error(e))?;
        self.unsynced_since = None;
        Ok(())
    }

    fn file_error(&self, source: queue_file::Error) -> OutboxError {
        OutboxError::File {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a time to pass in; the outbox only compares them
mod tests {
    use super::*;

    fn message(i: u32) -> Message {
        Message {
            topic: format!("spillway/s/g/sensor-{i}/inference"),
            payload: format!("{{\"id\":{i}}}").into_bytes(),
            results: 1 + i % 3,
        }
    }

    #[test]
    fn a_record_decodes_to_the_message_it_encodes_and_damage_is_an_error() -> anyhow::Result<()> {
        let m = message(7);
        assert_eq!(decode(&encode(&m))?, m);
        let record = encode(&m);
        assert!(decode(&record[..5]).is_err());
        assert!(decode(&record[..10]).is_err(), "cut inside the topic");
        let mut bad_utf8 = record.clone();
        bad_utf8[6] = 0xff;
        assert!(decode(&bad_utf8).is_err());
        Ok(())
    }

    #[test]
    fn messages_come_back_in_order_across_a_reopen_and_the_bound_refuses_the_excess()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state/outbox");
        let now = Instant::now();
        // The file's own header takes 8 KiB of the bound.
        let (mut outbox, set_aside) = Outbox::open(&path, 12 << 10)?;
        assert!(set_aside.is_none());
        let mut kept = 0;
        for i in 0..200 {
            if outbox.push(&message(i), now)? {
                kept += 1;
            }
        }
        assert!(kept > 10 && kept < 200, "4 KiB holds some, not all: {kept}");
        assert!(!outbox.push(&message(0), now)?, "full stays full");
        outbox.sync()?;
        drop(outbox);

        let (mut outbox, _) = Outbox::open(&path, 12 << 10)?;
        assert_eq!(outbox.len(), kept);
        for i in 0..kept {
            assert_eq!(outbox.peek()?, Some(message(i as u32)));
            outbox.pop()?;
        }
        assert!(outbox.is_empty());
        assert_eq!(outbox.peek()?, None);
        Ok(())
    }

    #[test]
    fn a_damaged_file_is_set_aside_and_a_new_outbox_started() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("outbox");
        std::fs::write(&path, b"not an outbox at all, just some bytes on disk")?;
        let (mut outbox, set_aside) = Outbox::open(&path, 1 << 20)?;
        assert!(set_aside.is_some());
        assert!(dir.path().join("outbox.bad").exists());
        assert!(outbox.is_empty());
        assert!(outbox.push(&message(1), Instant::now())?);
        assert_eq!(outbox.peek()?, Some(message(1)));
        Ok(())
    }
}
