//! [`FairQueue`]: the weighted fair queue of waiting requests (deficit round robin over one
//! FIFO per tenant), used inside the quota queues of the [`QuotaBoard`](crate::quota::QuotaBoard)
//! (per key and group) and of the [`KeyPool`](crate::key_pool::KeyPool) (per group, across
//! keys).
//!
//! * **Priority classes**: every waiting [`Interactive`](Priority::Interactive) item leaves
//!   before any waiting [`Batch`](Priority::Batch) item.
//! * **FIFO within a tenant.**
//! * **Weighted by admissions**: within a class, backlogged tenants take turns in a ring; a
//!   tenant of weight `w` leaves `w` items per turn (a tenant of weight 3 gets 3 admissions
//!   to another's 1 while both are backlogged).
//! * **Work-conserving, no banked credit**: a tenant with nothing queued is not in the ring (its
//!   share goes to the others); when it queues again it joins at the back with a fresh turn.
//! * **Bounded and O(1)**: an item is removed in O(1) (lazily from its tenant's FIFO,
//!   compacted when removed items outnumber queued ones); a tenant's FIFO is dropped when it
//!   empties, so memory is proportional to the items queued. Every operation is O(1)
//!   amortised, whatever the number of tenants.
//!
//! A request without a [`Tenant`] belongs to the anonymous default tenant (weight 1,
//! interactive): with a single tenant the queue is exactly FIFO.
//!
//! # Fair sharing in your own application
//!
//! An application that authenticates its users sets each request's tenant; every quota queue
//! below (the [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)'s, the key pool's) then
//! admits waiting requests fairly between users, and a
//! [`TenantLimitLayer`](crate::tenant::limit::TenantLimitLayer) enforces per-user limits:
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_claude::anthropic::RateLimitGroup;
//! use tower_claude::body::RequestBody;
//! use tower_claude::quota::Limits;
//! use tower_claude::rate_limit::RateLimitLayer;
//! use tower_claude::tenant::{Priority, Tenant};
//! use tower_claude::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
//!     let body = r#"{"type":"message","usage":{"input_tokens":20,"output_tokens":5}}"#;
//!     Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//! let client = ServiceBuilder::new()
//!     // In an axum app: a middleware (`axum::middleware::from_fn`) that inserts the signed-in
//!     // user's `Tenant`. Here, a map_request that does the same from a header.
//!     .map_request(|mut req: http::Request<RequestBody>| {
//!         let user = req.headers().get("x-user").and_then(|v| v.to_str().ok()).unwrap_or("guest");
//!         let tenant = match user {
//!             "nightly-report" => Tenant::new(user).priority(Priority::Batch),
//!             "vip" => Tenant::new(user).weight(3),
//!             _ => Tenant::new(user.to_owned()),
//!         };
//!         req.extensions_mut().insert(tenant);
//!         req
//!     })
//!     .layer(
//!         RateLimitLayer::new()
//!             .limits(RateLimitGroup::new("claude-haiku-4-5"), Limits::new(50, 100_000, 20_000))
//!             .max_wait(Duration::from_secs(60)),
//!     )
//!     .service(upstream);
//!
//! let request = http::Request::post("/v1/messages")
//!     .header("x-user", "vip")
//!     .body(RequestBody::from(r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[]}"#))?;
//! let response = client.oneshot(request).await?;
//! assert!(response.status().is_success());
//! # Ok(())
//! # }
//! ```
//!
//! The structure itself is public for queues of your own:
//!
//! ```
//! use tower_claude::tenant::fair::FairQueue;
//! use tower_claude::tenant::{Priority, Tenant};
//!
//! let (a, b) = (Tenant::new("a").weight(2), Tenant::new("b"));
//! let batch = Tenant::new("nightly").priority(Priority::Batch);
//! let mut q = FairQueue::new();
//! q.push(1, Some(&batch), "n1");
//! for (id, t) in [(2, &a), (3, &a), (4, &a), (5, &b), (6, &b)] {
//!     q.push(id, Some(t), "x");
//! }
//! let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|(id, _)| id)).collect();
//! // Interactive first; `a` takes two turns to `b`'s one; FIFO within each; batch last.
//! assert_eq!(order, [2, 3, 5, 4, 6, 1]);
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use super::{Priority, Tenant};

/// A tenant's flow: its class and its name (`None`: the anonymous default tenant).
#[derive(Clone, PartialEq, Eq, Hash)]
struct FlowKey {
    class: Priority,
    name: Option<Arc<str>>,
}

impl FlowKey {
    fn of(tenant: Option<&Tenant>) -> (Self, u32) {
        match tenant {
            Some(t) => (
                Self {
                    class: t.priority_class(),
                    name: Some(t.name_arc().clone()),
                },
                t.weight_value().max(1),
            ),
            None => (
                Self {
                    class: Priority::Interactive,
                    name: None,
                },
                1,
            ),
        }
    }

    fn class_index(&self) -> usize {
        match self.class {
            Priority::Interactive => 0,
            Priority::Batch => 1,
        }
    }
}

/// One tenant's FIFO (ids; removed ones are skipped lazily) and its place in the round.
struct Flow {
    ids: VecDeque<u64>,
    /// Ids in `ids` still queued.
    live: usize,
    weight: u32,
    /// Admissions left in the current turn (0: the next admission starts a turn).
    deficit: u32,
    /// Tells this flow's ring entry from a stale one of an earlier flow of the same tenant.
    epoch: u64,
}

struct Item<T> {
    flow: FlowKey,
    value: T,
}

/// One priority class: the ring of its backlogged flows (stale entries skipped lazily).
#[derive(Default)]
struct Class {
    ring: VecDeque<(FlowKey, u64)>,
    /// The flow whose turn just ended, out of the ring until the class's next admission: it
    /// then goes to the back, behind any tenant that arrived meanwhile (who would otherwise
    /// wait for one more turn of it).
    parked: Option<(FlowKey, u64)>,
    flows: usize,
}

/// Below this, a FIFO or ring is never compacted (compaction is amortised over removals).
const COMPACT_SLACK: usize = 16;

/// A weighted fair queue of items, each under a caller-chosen unique id: deficit round robin
/// over one FIFO per tenant, `interactive` before `batch` (see the [module docs](self)).
pub struct FairQueue<T> {
    classes: [Class; 2],
    flows: HashMap<FlowKey, Flow>,
    items: HashMap<u64, Item<T>>,
    next_epoch: u64,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for FairQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FairQueue")
            .field("len", &self.items.len())
            .field("tenants", &self.flows.len())
            .finish()
    }
}

impl<T> FairQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self {
            classes: [Class::default(), Class::default()],
            flows: HashMap::new(),
            items: HashMap::new(),
            next_epoch: 0,
        }
    }

    /// Queues `value` under `id` at the back of `tenant`'s FIFO (`None`: the anonymous
    /// default tenant). A tenant with nothing queued joins the back of its class's round.
    /// The tenant's current weight applies from its next turn. Returns `false` (and queues
    /// nothing) when `id` is queued already.
    pub fn push(&mut self, id: u64, tenant: Option<&Tenant>, value: T) -> bool {
        if self.items.contains_key(&id) {
            return false;
        }
        let (key, weight) = FlowKey::of(tenant);
        let flow = match self.flows.get_mut(&key) {
            Some(flow) => flow,
            None => {
                self.next_epoch += 1;
                let epoch = self.next_epoch;
                let class = &mut self.classes[key.class_index()];
                class.ring.push_back((key.clone(), epoch));
                class.flows += 1;
                self.flows.entry(key.clone()).or_insert(Flow {
                    ids: VecDeque::new(),
                    live: 0,
                    weight,
                    deficit: 0,
                    epoch,
                })
            }
        };
        flow.weight = weight;
        flow.ids.push_back(id);
        flow.live += 1;
        self.items.insert(id, Item { flow: key, value });
        true
    }

    /// The id and value that [`pop`](Self::pop) would return.
    pub fn peek(&self) -> Option<(u64, &T)> {
        let id = self.peek_id()?;
        self.items.get(&id).map(|item| (id, &item.value))
    }

    /// The id that [`pop`](Self::pop) would return.
    pub fn peek_id(&self) -> Option<u64> {
        // Invariant: the front of a ring is a live flow whose FIFO starts with a queued id.
        self.classes.iter().find_map(|class| {
            let (key, epoch) = class.ring.front().or(class.parked.as_ref())?;
            let flow = self.flows.get(key).filter(|f| f.epoch == *epoch)?;
            flow.ids.front().copied()
        })
    }

    /// Takes the next item: the head of the first flow in the round of the highest class that
    /// has items, counted against that flow's turn.
    pub fn pop(&mut self) -> Option<(u64, T)> {
        let c = self.classes.iter().position(|c| {
            !c.ring.is_empty()
                || c.parked
                    .as_ref()
                    .is_some_and(|(k, e)| self.flows.get(k).is_some_and(|f| f.epoch == *e))
        })?;
        // The flow whose turn ended goes round again, behind the ones that arrived meanwhile.
        if let Some(parked) = self.classes[c].parked.take() {
            self.classes[c].ring.push_back(parked);
            self.settle_front(c);
        }
        let (key, _) = self.classes[c].ring.front()?.clone();
        let flow = self.flows.get_mut(&key)?;
        let id = flow.ids.pop_front()?;
        let item = self.items.remove(&id)?;
        flow.live -= 1;
        if flow.deficit == 0 {
            flow.deficit = flow.weight;
        }
        flow.deficit -= 1;
        Self::trim(flow, &self.items);
        let class = &mut self.classes[c];
        if flow.live == 0 {
            // Leaves the round; no credit is kept for a later return.
            self.flows.remove(&key);
            class.flows -= 1;
            class.ring.pop_front();
        } else if flow.deficit == 0 {
            class.parked = class.ring.pop_front();
        }
        self.settle_front(c);
        Some((id, item.value))
    }

    /// Removes the item queued under `id` (a cancelled waiter), wherever it is.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let item = self.items.remove(&id)?;
        let c = item.flow.class_index();
        if let Some(flow) = self.flows.get_mut(&item.flow) {
            flow.live -= 1;
            if flow.live == 0 {
                self.flows.remove(&item.flow);
                self.classes[c].flows -= 1;
            } else {
                Self::trim(flow, &self.items);
                if flow.ids.len() > 2 * flow.live + COMPACT_SLACK {
                    let items = &self.items;
                    flow.ids.retain(|id| items.contains_key(id));
                }
            }
        }
        self.settle_front(c);
        let flows = &self.flows;
        let class = &mut self.classes[c];
        if class
            .parked
            .as_ref()
            .is_some_and(|(k, e)| flows.get(k).is_none_or(|f| f.epoch != *e))
        {
            class.parked = None;
        }
        if class.ring.len() > 2 * class.flows + COMPACT_SLACK {
            class
                .ring
                .retain(|(k, epoch)| flows.get(k).is_some_and(|f| f.epoch == *epoch));
        }
        Some(item.value)
    }

    /// The value queued under `id`.
    pub fn get(&self, id: u64) -> Option<&T> {
        self.items.get(&id).map(|i| &i.value)
    }

    /// The value queued under `id`, mutably.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.items.get_mut(&id).map(|i| &mut i.value)
    }

    /// Whether `id` is queued.
    pub fn contains(&self, id: u64) -> bool {
        self.items.contains_key(&id)
    }

    /// The number of items queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The number of tenants with items queued.
    pub fn tenants(&self) -> usize {
        self.flows.len()
    }

    /// Drops removed ids from the front of a flow's FIFO.
    fn trim(flow: &mut Flow, items: &HashMap<u64, Item<T>>) {
        while flow.ids.front().is_some_and(|id| !items.contains_key(id)) {
            flow.ids.pop_front();
        }
    }

    /// Drops stale entries (flows that emptied) from the front of class `c`'s ring.
    fn settle_front(&mut self, c: usize) {
        let flows = &self.flows;
        let ring = &mut self.classes[c].ring;
        while ring
            .front()
            .is_some_and(|(k, epoch)| flows.get(k).is_none_or(|f| f.epoch != *epoch))
        {
            ring.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;

    fn tenants() -> Vec<Tenant> {
        vec![
            Tenant::new("a").weight(3),
            Tenant::new("b"),
            Tenant::new("c").weight(2),
            Tenant::new("n").priority(Priority::Batch),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(usize),
        Pop,
        Remove(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..5usize).prop_map(Op::Push),
            3 => Just(Op::Pop),
            1 => (0..64usize).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Nothing is lost or duplicated, each tenant's items leave in their order, interactive
        /// before batch, and the queue's size matches a model's.
        #[test]
        fn no_loss_no_duplicate_fifo_per_tenant(ops in proptest::collection::vec(op(), 1..300)) {
            let ts = tenants();
            let mut q = FairQueue::new();
            let mut model: HashMap<u64, usize> = HashMap::new(); // id -> tenant index (4: anonymous)
            let mut next = 0u64;
            let mut out = BTreeSet::new();
            let mut last_out: HashMap<usize, u64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Push(t) => {
                        next += 1;
                        prop_assert!(q.push(next, ts.get(t), t));
                        prop_assert!(!q.push(next, ts.get(t), t), "a duplicate id is refused");
                        model.insert(next, t);
                    }
                    Op::Pop => {
                        let peeked = q.peek_id();
                        match q.pop() {
                            Some((id, t)) => {
                                prop_assert_eq!(Some(id), peeked);
                                prop_assert_eq!(model.remove(&id), Some(t));
                                prop_assert!(out.insert(id), "popped twice");
                                if let Some(prev) = last_out.insert(t, id) {
                                    prop_assert!(prev < id, "FIFO within a tenant");
                                }
                                if t == 3 {
                                    prop_assert!(model.values().all(|&m| m == 3), "batch before interactive");
                                }
                            }
                            None => prop_assert!(model.is_empty()),
                        }
                    }
                    Op::Remove(i) => {
                        let id = i as u64;
                        let removed = q.remove(id);
                        prop_assert_eq!(removed, model.remove(&id));
                        if removed.is_some() {
                            prop_assert!(out.insert(id));
                        }
                    }
                }
                prop_assert_eq!(q.len(), model.len());
                let tenants: BTreeSet<usize> = model.values().copied().collect();
                prop_assert_eq!(q.tenants(), tenants.len());
                // Memory stays proportional to what is queued.
                let ids: usize = q.flows.values().map(|f| f.ids.len()).sum();
                prop_assert!(ids <= 2 * q.len() + COMPACT_SLACK * q.tenants().max(1) + 1);
                for c in &q.classes {
                    prop_assert!(c.ring.len() <= 2 * c.flows + COMPACT_SLACK + 1);
                }
            }
            // Drain: everything left comes out once.
            while let Some((id, t)) = q.pop() {
                prop_assert_eq!(model.remove(&id), Some(t));
            }
            prop_assert!(model.is_empty());
            prop_assert!(q.flows.is_empty());
        }

        /// Backlogged tenants get admissions in the ratio of their weights, within one turn.
        #[test]
        fn share_ratio(wa in 1u32..6, wb in 1u32..6, n in 50usize..300) {
            let a = Tenant::new("a").weight(wa);
            let b = Tenant::new("b").weight(wb);
            let mut q = FairQueue::new();
            let mut id = 0;
            for _ in 0..1_000 {
                id += 1;
                q.push(id, Some(&a), 'a');
                id += 1;
                q.push(id, Some(&b), 'b');
            }
            let mut counts = (0u32, 0u32);
            for _ in 0..n {
                match q.pop().unwrap().1 {
                    'a' => counts.0 += 1,
                    _ => counts.1 += 1,
                }
            }
            // Within one turn of the exact weighted share.
            let exact = n as f64 * wa as f64 / (wa + wb) as f64;
            prop_assert!((counts.0 as f64 - exact).abs() <= wa.max(wb) as f64, "{counts:?} vs {exact}");
        }
    }

    #[test]
    fn an_idle_tenant_banks_no_credit_and_joins_at_the_back() {
        let (a, b, c) = (
            Tenant::new("a").weight(5),
            Tenant::new("b"),
            Tenant::new("c"),
        );
        let mut q = FairQueue::new();
        for id in 0..10 {
            q.push(id, Some(&b), ());
        }
        for id in 10..12 {
            q.push(id, Some(&c), ());
        }
        // `a` was idle: it does not jump ahead, and its weight counts from its turn.
        for id in 20..30 {
            q.push(id, Some(&a), ());
        }
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|(id, _)| id))
            .take(10)
            .collect();
        assert_eq!(order, [0, 10, 20, 21, 22, 23, 24, 1, 11, 25]);
    }

    #[test]
    fn a_newcomer_goes_before_the_tenant_whose_turn_just_ended() {
        let (a, b) = (Tenant::new("a"), Tenant::new("b"));
        let mut q = FairQueue::new();
        for id in 0..10 {
            q.push(id, Some(&a), ());
        }
        assert_eq!(q.pop().map(|(id, _)| id), Some(0));
        // `a`'s turn ended; `b` arrives before the next admission and takes it.
        q.push(100, Some(&b), ());
        assert_eq!(q.peek_id(), Some(100));
        assert_eq!(q.pop().map(|(id, _)| id), Some(100));
        assert_eq!(q.pop().map(|(id, _)| id), Some(1));
    }

    #[test]
    fn one_tenant_is_fifo() {
        let mut q = FairQueue::new();
        for id in 0..100 {
            q.push(id, None, id);
        }
        q.remove(50);
        q.remove(0);
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|(id, _)| id)).collect();
        let expected: Vec<u64> = (1..100).filter(|&i| i != 50).collect();
        assert_eq!(order, expected);
    }
}
