//! The configuration a [`KeyPool`](super::KeyPool) service and its response futures share.

use std::time::Duration;

use crate::anthropic::ModelCatalog;
use crate::quota::{OutputReservation, QuotaBoard};

/// The options of a key pool layer, shared by its services and response futures.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) board: QuotaBoard,
    /// The board is the layer's own: feed it from response headers.
    pub(crate) own_board: bool,
    pub(crate) catalog: ModelCatalog,
    pub(crate) output: OutputReservation,
    pub(crate) default_cooldown: Duration,
    pub(crate) max_cooldown: Duration,
    pub(crate) forbidden_cooldown: Duration,
}
