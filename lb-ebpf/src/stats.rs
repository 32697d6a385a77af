//! Per-CPU counters. Each is a plain add on this CPU's copy: no atomics, no contention.
//! The outcome counters also log (debug only: see `logs`).

use aya_ebpf::programs::XdpContext;
use lb_common::{Action, DropReason, Event};

use crate::{
    logs,
    maps::{ACTIONS, BACKEND_STATS, DROPS, EVENTS, SERVICE_STATS},
};

/// Counts a dropped packet under its reason (and logs it when debug logs are on).
#[inline(always)]
pub fn drop(ctx: &XdpContext, reason: DropReason) {
    count_drop(reason);
    logs::drop(ctx, reason);
}

/// Counts a dropped packet under its reason, without logging.
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(c) = DROPS.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
}

/// Counts a packet that left the program with `action` (and logs the rare ones when
/// debug logs are on).
#[inline(always)]
pub fn action(ctx: &XdpContext, action: Action) {
    count_action(action);
    logs::action(ctx, action);
}

/// Counts a packet that left the program with `action`, without logging.
#[inline(always)]
pub fn count_action(action: Action) {
    if let Some(c) = ACTIONS.get_ptr_mut(action as u32) {
        unsafe { *c += 1 };
    }
}

/// Counts an event.
#[inline(always)]
pub fn event(event: Event) {
    if let Some(c) = EVENTS.get_ptr_mut(event as u32) {
        unsafe { *c += 1 };
    }
}

/// Counts a new flow of a service. Its packets and bytes are its backends' (see
/// `lb_common::ServiceStats`).
#[inline(always)]
pub fn new_flow(service: u32) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service) {
        unsafe { (*s).new_flows += 1 };
    }
}

/// Counts a packet sent to a backend.
#[inline(always)]
pub fn backend(id: u32, bytes: u64) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}

/// Takes back a packet counted for a backend (`backend`) that did not go to it.
#[inline(always)]
pub fn backend_taken_back(id: u32, bytes: u64) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(id) {
        unsafe {
            (*s).packets = (*s).packets.wrapping_sub(1);
            (*s).bytes = (*s).bytes.wrapping_sub(bytes);
        }
    }
}
