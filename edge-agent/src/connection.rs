//! The broker connection: rumqttc's event loop, and the publishes it would forget.
//!
//! rumqttc keeps every QoS 1 publish until the broker acknowledges it. When the connection
//! drops, it moves them, with the requests still waiting in its channel, to a list it replays
//! on the next connection, but it clears that list when the broker has no session for the
//! client (a clean session, or a broker restarted without persistence). The results computed
//! just before and during an outage would be lost there. [`Connection`] takes the list as soon
//! as a poll fails and puts its publishes back after the next `CONNACK` ([`Carried`]): as they
//! were, same packet id with DUP set, when the broker resumed the session, and as new
//! publishes otherwise (a publish rumqttc held back for a packet id still in use goes with
//! them). Other requests (subscribe, unsubscribe, disconnect) are dropped; the agent
//! subscribes afresh on every connection. What is carried is bounded by what rumqttc itself
//! holds: its in-flight window and its request channel.

use std::collections::VecDeque;
use std::sync::Arc;

use rumqttc::{ConnectionError, Event, EventLoop, Packet, Publish, Request};
use tokio::sync::watch;

use crate::telemetry::Counters;

/// Publishes unacknowledged when a connection dropped, held for the next one.
#[derive(Debug, Default)]
pub struct Carried {
    publishes: VecDeque<Publish>,
}

impl Carried {
    /// Takes the publishes out of `pending` (the event loop's list for the next connection),
    /// in order, after any carried from an earlier drop.
    pub fn take_from(&mut self, pending: &mut VecDeque<Request>) {
        self.publishes
            .extend(pending.drain(..).filter_map(|request| match request {
                Request::Publish(publish) => Some(publish),
                _ => None,
            }));
    }

    /// Puts every carried publish at the front of `pending`, in order, for a connection the
    /// broker just accepted; returns how many.
    pub fn restore_into(
        &mut self,
        pending: &mut VecDeque<Request>,
        session_present: bool,
    ) -> usize {
        let restored = self.publishes.len();
        for mut publish in self.publishes.drain(..).rev() {
            if session_present {
                // The broker may have it already: the same packet id, marked as a resend.
                publish.dup = true;
            } else {
                // A new session knows no packet ids: the event loop assigns a fresh one.
                publish.pkid = 0;
                publish.dup = false;
            }
            pending.push_front(Request::Publish(publish));
        }
        restored
    }

    /// How many publishes wait for the next connection.
    pub fn len(&self) -> usize {
        self.publishes.len()
    }

    /// Whether none does.
    pub fn is_empty(&self) -> bool {
        self.publishes.is_empty()
    }
}

/// rumqttc's event loop, with the publishes of a dropped connection carried to the next.
pub struct Connection {
    eventloop: EventLoop,
    carried: Carried,
    counters: Arc<Counters>,
    connected: watch::Sender<bool>,
}

impl Connection {
    /// Wraps an event loop that has not been polled yet.
    pub fn new(eventloop: EventLoop, counters: Arc<Counters>) -> Connection {
        Connection {
            eventloop,
            carried: Carried::default(),
            counters,
            connected: watch::Sender::new(false),
        }
    }

    /// Whether the broker has accepted the connection and no poll has failed since.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Polls the event loop once, as [`EventLoop::poll`] does: on an error the next call
    /// reconnects.
    ///
    /// Cancel-safe as far as rumqttc's poll is: the carrying happens after it returns, with no
    /// await in between.
    pub async fn poll(&mut self) -> Result<Event, ConnectionError> {
        let event = self.eventloop.poll().await;
        match &event {
            Err(_) => {
                self.connected.send_replace(false);
                self.carry_pending();
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                self.connected.send_replace(true);
                let restored = self
                    .carried
                    .restore_into(&mut self.eventloop.pending, ack.session_present);
                if restored > 0 {
                    self.counters
                        .mqtt_republished
                        .fetch_add(restored as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        restored,
                        session_present = ack.session_present,
                        "publishing again what the broker had not acknowledged"
                    );
                }
            }
            Ok(_) => {}
        }
        event
    }

    /// Publishes waiting for the broker to come back.
    pub fn carried(&self) -> usize {
        self.carried.len()
    }

    /// Takes every publish not acknowledged yet: carried ones, in flight, and still waiting
    /// in the client's channel. For a stop that cannot wait for the broker any longer.
    pub fn take_unacknowledged(&mut self) -> Vec<Publish> {
        // Moves what is in flight and what waits in the channel to `pending`.
        self.eventloop.clean();
        self.carry_pending();
        self.carried.publishes.drain(..).collect()
    }

    fn carry_pending(&mut self) {
        // A publish held back for a packet id still in use is in neither list.
        if let Some(publish) = self.eventloop.state.collision.take() {
            self.eventloop.pending.push_front(Request::Publish(publish));
        }
        self.carried.take_from(&mut self.eventloop.pending);
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::{QoS, Subscribe};

    use super::*;

    fn publish(topic: &str, pkid: u16) -> Request {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, topic.as_bytes().to_vec());
        p.pkid = pkid;
        Request::Publish(p)
    }

    fn topics_and_ids(pending: &VecDeque<Request>) -> Vec<(String, u16, bool)> {
        pending
            .iter()
            .map(|r| match r {
                Request::Publish(p) => (p.topic.clone(), p.pkid, p.dup),
                other => panic!("only publishes are restored, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_new_session_gets_every_publish_again_in_order_with_fresh_ids() {
        let mut carried = Carried::default();
        let mut pending: VecDeque<Request> = [
            publish("a", 7),
            Request::Subscribe(Subscribe::new("x/#", QoS::AtLeastOnce)),
            publish("b", 8),
            publish("c", 0),
        ]
        .into();
        carried.take_from(&mut pending);
        assert!(pending.is_empty(), "the event loop would clear them");
        assert_eq!(carried.len(), 3);

        // A second drop before any connection carries its publishes after the first ones.
        let mut again: VecDeque<Request> = [publish("d", 1)].into();
        carried.take_from(&mut again);

        let mut next: VecDeque<Request> = VecDeque::new();
        assert_eq!(carried.restore_into(&mut next, false), 4);
        assert!(carried.is_empty());
        assert_eq!(
            topics_and_ids(&next),
            [
                ("a".into(), 0, false),
                ("b".into(), 0, false),
                ("c".into(), 0, false),
                ("d".into(), 0, false)
            ]
        );
    }

    #[test]
    fn a_resumed_session_gets_them_with_their_ids_marked_as_resent_before_anything_else() {
        let mut carried = Carried::default();
        carried.take_from(&mut [publish("a", 7), publish("b", 8)].into());
        let mut next: VecDeque<Request> = [publish("new", 0)].into();
        assert_eq!(carried.restore_into(&mut next, true), 2);
        assert_eq!(
            topics_and_ids(&next),
            [
                ("a".into(), 7, true),
                ("b".into(), 8, true),
                ("new".into(), 0, false)
            ]
        );
    }
}
