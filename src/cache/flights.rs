//! Request coalescing: the requests in flight upstream, by key, and the followers waiting
//! for each (see the module docs, *Coalescing*).

use std::collections::hash_map::Entry;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::key::{CacheKey, KeyMap};
use super::live::{Live, LiveBody};
use super::store::CachedResponse;

/// Requests in flight upstream, by key, with the followers waiting for each.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<KeyMap<Flight>>,
    next_id: AtomicU64,
}

struct Flight {
    id: u64,
    waiters: Vec<oneshot::Sender<Shared>>,
    /// A streaming answer being read: followers read it live.
    live: Option<Arc<Live>>,
}

/// What a follower receives from its leader.
#[derive(Debug)]
pub(crate) enum Shared {
    /// The stored answer.
    Entry(CachedResponse),
    /// A reader of the stream in flight (already subscribed).
    Live(LiveBody),
}

pub(crate) enum Join {
    Lead(FlightGuard),
    Follow(oneshot::Receiver<Shared>),
    Live(LiveBody),
}

impl Flights {
    pub(crate) fn join(self: &Arc<Self>, key: CacheKey) -> Join {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // One probe of the map (an entry), not a lookup and then an insert.
        let id = match map.entry(key) {
            Entry::Occupied(mut flight) => {
                let flight = flight.get_mut();
                if let Some(live) = &flight.live {
                    return Join::Live(live.subscribe());
                }
                let (tx, rx) = oneshot::channel();
                flight.waiters.push(tx);
                return Join::Follow(rx);
            }
            Entry::Vacant(vacant) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                vacant.insert(Flight {
                    id,
                    waiters: Vec::new(),
                    live: None,
                });
                id
            }
        };
        Join::Lead(FlightGuard {
            flights: self.clone(),
            key,
            id,
            finished: false,
        })
    }

    /// The number of keys in flight.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The leader's handle on its flight. `complete` hands the stored answer to every follower;
/// dropping the guard without completing (error, non-2xx, cancellation, unstorable body)
/// drops the followers' senders, and each follower looks up again and may lead.
pub(crate) struct FlightGuard {
    flights: Arc<Flights>,
    key: CacheKey,
    id: u64,
    /// The flight was ended by [`finish`](Self::finish): nothing left to do when dropped.
    finished: bool,
}

impl FlightGuard {
    fn take(&self) -> Option<Flight> {
        let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.entry(self.key) {
            Entry::Occupied(flight) if flight.get().id == self.id => Some(flight.remove()),
            _ => None,
        }
    }

    /// Ends the flight with the answer to store: `store` is given the entry while the
    /// flights are locked, so that the flight is gone only once the answer can be found (a
    /// request arriving meanwhile follows this flight and gets the answer; one arriving after
    /// finds it stored or queued), then every follower gets a copy. One lock and one probe of
    /// the map for the usual miss that nobody follows (asking whether a follower waits, then
    /// removing the flight, was two of each), and no copy of the entry then.
    pub(crate) fn finish(mut self, entry: CachedResponse, store: impl FnOnce(CachedResponse)) {
        self.finished = true;
        let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
        let waiters = match map.entry(self.key) {
            Entry::Occupied(flight) if flight.get().id == self.id => flight.remove().waiters,
            _ => Vec::new(),
        };
        if waiters.is_empty() {
            store(entry);
            return;
        }
        store(entry.clone());
        drop(map);
        for waiter in waiters {
            let _ = waiter.send(Shared::Entry(entry.clone()));
        }
    }

    pub(crate) fn complete(self, entry: &CachedResponse) {
        if let Some(flight) = self.take() {
            for waiter in flight.waiters {
                let _ = waiter.send(Shared::Entry(entry.clone()));
            }
        }
    }

    /// The answer is a stream, read into `live`: the followers so far get a reader each, and
    /// later ones subscribe as they join.
    pub(crate) fn publish(&self, live: &Arc<Live>) {
        let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = map.get_mut(&self.key).filter(|f| f.id == self.id) {
            for waiter in flight.waiters.drain(..) {
                let _ = waiter.send(Shared::Live(live.subscribe()));
            }
            flight.live = Some(live.clone());
        }
    }

    /// Ends the flight and its stream if no subscriber is left (see
    /// [`Live::close_if_unread`]); the flights stay locked meanwhile, so no follower joins a
    /// stream that is being dropped.
    pub(crate) fn close_if_unread(&self, live: &Live) -> bool {
        let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
        if !live.close_if_unread() {
            return false;
        }
        if map.get(&self.key).is_some_and(|f| f.id == self.id) {
            map.remove(&self.key);
        }
        true
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if !self.finished {
            drop(self.take());
        }
    }
}

impl fmt::Debug for FlightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlightGuard").field("id", &self.id).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn entry() -> CachedResponse {
        CachedResponse::new(StatusCode::OK, http::HeaderMap::new(), "{}".into(), false)
    }

    #[tokio::test]
    async fn followers_get_the_leaders_answer() {
        let flights = Arc::new(Flights::default());
        let k = CacheKey::from_bytes([1; 32]);
        let Join::Lead(guard) = flights.join(k) else {
            panic!("first joins as leader")
        };
        let Join::Follow(a) = flights.join(k) else {
            panic!("second follows")
        };
        let Join::Follow(b) = flights.join(k) else {
            panic!("third follows")
        };
        guard.complete(&entry());
        for rx in [a, b] {
            assert!(matches!(rx.await.unwrap(), Shared::Entry(e) if e == entry()));
        }
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn finish_stores_the_answer_then_hands_it_to_the_followers() {
        let flights = Arc::new(Flights::default());
        let k = CacheKey::from_bytes([3; 32]);
        let mut stored = Vec::new();
        // Nobody follows: stored once, the flight closed.
        let Join::Lead(guard) = flights.join(k) else {
            panic!("leader")
        };
        guard.finish(entry(), |e| stored.push(e));
        assert_eq!((stored.len(), flights.len()), (1, 0));
        // Two followers: stored once more, each gets the answer.
        let Join::Lead(guard) = flights.join(k) else {
            panic!("leader")
        };
        let (Join::Follow(a), Join::Follow(b)) = (flights.join(k), flights.join(k)) else {
            panic!("followers")
        };
        guard.finish(entry(), |e| stored.push(e));
        assert_eq!((stored.len(), flights.len()), (2, 0));
        for rx in [a, b] {
            assert!(matches!(rx.await.unwrap(), Shared::Entry(e) if e == entry()));
        }
        // A stale guard stores its answer and leaves the newer flight open.
        let Join::Lead(old) = flights.join(k) else {
            panic!("leader")
        };
        flights.map.lock().unwrap().remove(&k);
        let Join::Lead(_new) = flights.join(k) else {
            panic!("new leader")
        };
        old.finish(entry(), |e| stored.push(e));
        assert_eq!((stored.len(), flights.len()), (3, 1));
    }

    #[tokio::test]
    async fn followers_of_a_stream_read_it_live_and_it_closes_only_when_unread() {
        let flights = Arc::new(Flights::default());
        let k = CacheKey::from_bytes([2; 32]);
        let Join::Lead(guard) = flights.join(k) else {
            panic!("leader")
        };
        let Join::Follow(early) = flights.join(k) else {
            panic!("follower before the head")
        };
        let live = Live::new(http::StatusCode::OK, http::HeaderMap::new());
        let mine = live.subscribe();
        guard.publish(&live);
        let Ok(Shared::Live(early)) = early.await else {
            panic!("the early follower gets a reader")
        };
        let Join::Live(late) = flights.join(k) else {
            panic!("a later follower subscribes directly")
        };
        assert!(!guard.close_if_unread(&live), "three readers");
        drop((mine, early, late));
        assert!(guard.close_if_unread(&live));
        assert_eq!(flights.len(), 0, "closed: the next request leads");
        assert!(matches!(flights.join(k), Join::Lead(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_followers_without_an_answer() {
        let flights = Arc::new(Flights::default());
        let k = CacheKey::from_bytes([1; 32]);
        let Join::Lead(guard) = flights.join(k) else {
            panic!("leader")
        };
        let Join::Follow(a) = flights.join(k) else {
            panic!("follower")
        };
        drop(guard);
        assert!(a.await.is_err());
        assert!(
            matches!(flights.join(k), Join::Lead(_)),
            "a follower can lead next"
        );
    }

    #[test]
    fn a_stale_guard_does_not_remove_a_newer_flight() {
        let flights = Arc::new(Flights::default());
        let k = CacheKey::from_bytes([1; 32]);
        let Join::Lead(old) = flights.join(k) else {
            panic!("leader")
        };
        flights.map.lock().unwrap().remove(&k);
        let Join::Lead(_new) = flights.join(k) else {
            panic!("new leader")
        };
        drop(old);
        assert_eq!(flights.len(), 1);
    }
}
