//! Backend selection: the connection table first, Maglev on a miss.

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use lb_common::{Backend, FlowKey, FlowState, SERVICE_F_AFFINITY_CLIENT_IP, VipInfo, flow_hash};

use crate::{
    logs,
    maps::{BACKENDS, FLOWS, RINGS, SCRATCH},
};

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

/// The backend the connection table remembers for `key`, if it still serves this service.
#[inline(always)]
fn remembered(key: &FlowKey, vip: &VipInfo) -> Option<Choice> {
    let state = unsafe { FLOWS.get(key) }?;
    let id = state.backend;
    if state.service != vip.service {
        return None;
    }
    let b = BACKENDS.get(id)?;
    if b.family != key.family || b.service != vip.service {
        return None;
    }
    Some(Choice {
        id,
        backend: *b,
        new_flow: false,
    })
}

/// The backend the service's Maglev table gives `key` (ports ignored under client-IP
/// affinity); no state is read or written.
#[inline(always)]
pub fn from_table(key: &FlowKey, vip: &VipInfo) -> Option<Choice> {
    let size = unsafe { core::ptr::read_volatile(&RING_SIZE) };
    if size == 0 {
        return None;
    }
    let hash = if vip.flags & SERVICE_F_AFFINITY_CLIENT_IP != 0 {
        let scratch = SCRATCH.get_ptr_mut(0)?;
        // SAFETY: this CPU's scratch entry; only its `hash` field is used here.
        let hkey: &mut FlowKey = unsafe { &mut (*scratch).hash };
        *hkey = *key;
        hkey.sport = 0;
        hkey.dport = 0;
        flow_hash(hkey)
    } else {
        flow_hash(key)
    };
    let slot = vip.ring.wrapping_mul(size) + hash % size;
    let id = *RINGS.get(slot)?;
    let backend = *BACKENDS.get(id)?;
    if backend.family != key.family || backend.service != vip.service {
        return None;
    }
    Some(Choice {
        id,
        backend,
        new_flow: true,
    })
}

/// Picks the backend of a flow and records it.
///
/// A connection-table hit keeps the flow where it is as long as that backend still
/// exists for this service; a TCP SYN always chooses afresh so a reused 5-tuple is
/// balanced by the current table. A miss consults the service's active Maglev table and
/// records the choice.
#[inline(always)]
pub fn select(key: &FlowKey, vip: &VipInfo, syn: bool) -> Option<Choice> {
    if !syn && let Some(c) = remembered(key, vip) {
        return Some(c);
    }
    let choice = from_table(key, vip)?;
    // The creation stamp costs one clock read per new entry only; packets that find their
    // entry never write it (no per-packet stores on the established path).
    // SAFETY: bpf_ktime_get_ns takes no arguments and cannot fail.
    let created_ns = unsafe { bpf_ktime_get_ns() };
    let _ = FLOWS.insert(
        key,
        FlowState {
            backend: choice.id,
            service: vip.service,
            created_ns,
        },
        0,
    );
    logs::new_flow(key, vip.service, choice.id);
    Some(choice)
}

/// The backend that owns a flow, without recording anything (for ICMP errors about it).
#[inline(always)]
pub fn owner(key: &FlowKey, vip: &VipInfo) -> Option<Choice> {
    let choice = match remembered(key, vip) {
        Some(c) => c,
        None => from_table(key, vip)?,
    };
    logs::icmp_error(key, vip.service, choice.id);
    Some(choice)
}
