//! Backend selection: the connection table first, Maglev on a miss.

use lb_common::{Backend, FlowKey, FlowState, VipInfo, flow_hash};

use crate::maps::{BACKENDS, FLOWS, RINGS};

/// Entries per Maglev table; set by the agent at load time.
#[unsafe(no_mangle)]
static RING_SIZE: u32 = 0;

/// The chosen backend and whether the choice was fresh (not from the connection table).
pub struct Choice {
    /// Backend id.
    pub id: u32,
    /// The backend's entry.
    pub backend: Backend,
    /// True when Maglev chose (a new flow, or one the table had lost).
    pub new_flow: bool,
}

/// Picks the backend of a flow.
///
/// A connection-table hit keeps the flow where it is as long as that backend still
/// exists for this service; a TCP SYN always chooses afresh so a reused 5-tuple is
/// balanced by the current table. A miss consults the service's active Maglev table and
/// records the choice.
#[inline(always)]
pub fn select(key: &FlowKey, vip: &VipInfo, syn: bool) -> Option<Choice> {
    if !syn && let Some(state) = unsafe { FLOWS.get(key) } {
        let id = state.backend;
        if state.service == vip.service
            && let Some(b) = BACKENDS.get(id)
            && b.family == key.family
            && b.service == vip.service
        {
            return Some(Choice {
                id,
                backend: *b,
                new_flow: false,
            });
        }
    }
    let size = unsafe { core::ptr::read_volatile(&RING_SIZE) };
    if size == 0 {
        return None;
    }
    let mut hkey = *key;
    if vip.flags & lb_common::SERVICE_F_AFFINITY_CLIENT_IP != 0 {
        hkey.sport = 0;
        hkey.dport = 0;
    }
    let slot = vip.ring.wrapping_mul(size) + flow_hash(&hkey) % size;
    let id = *RINGS.get(slot)?;
    let backend = *BACKENDS.get(id)?;
    if backend.family != key.family || backend.service != vip.service {
        return None;
    }
    let _ = FLOWS.insert(
        key,
        FlowState {
            backend: id,
            service: vip.service,
        },
        0,
    );
    Some(Choice {
        id,
        backend,
        new_flow: true,
    })
}
