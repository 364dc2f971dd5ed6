//! BTF-defined maps (the `.maps` section) that are pinned by name.
//!
//! aya-ebpf 0.2.1 has BTF map types (`aya_ebpf::btf_maps`), but their definition struct has no
//! `pinning` field, so a map declared with them is never pinned by the loader. This is the same
//! libbpf-style definition with the field added: `pinning = LIBBPF_PIN_BY_NAME` (1), which aya
//! 0.14's loader honours by opening or creating `<default_map_pin_directory>/<map name>`.
//!
//! The definition struct carries the map's type, key and value types, capacity and flags as BTF
//! (pointers to arrays whose length is the number), never as data; the key and value types are
//! what the kernel records for the map, and what `bpftool map dump` prints fields by.
use core::{ffi::c_void, ptr::NonNull};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_map_type},
    helpers::{bpf_map_delete_elem, bpf_map_lookup_elem, bpf_map_update_elem},
};

/// libbpf's `LIBBPF_PIN_BY_NAME`.
const PIN_BY_NAME: usize = 1;

/// A libbpf-style BTF map definition with `pinning` (see the module comment). Field names are the
/// ones loaders look for; `repr(C)` keeps their order.
#[repr(C)]
pub struct PinnedMap<const TYPE: usize, K, V, const MAX_ENTRIES: usize, const FLAGS: usize> {
    r#type: *const [i32; TYPE],
    key: *const K,
    value: *const V,
    max_entries: *const [i32; MAX_ENTRIES],
    map_flags: *const [i32; FLAGS],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the fields are BTF-only placeholders, never dereferenced; the kernel synchronises
// access to the map itself.
unsafe impl<const TYPE: usize, K, V, const MAX_ENTRIES: usize, const FLAGS: usize> Sync
    for PinnedMap<TYPE, K, V, MAX_ENTRIES, FLAGS>
{
}

impl<const TYPE: usize, K, V, const MAX_ENTRIES: usize, const FLAGS: usize> PinnedMap<TYPE, K, V, MAX_ENTRIES, FLAGS> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }

    #[inline(always)]
    fn lookup(&self, key: &K) -> Option<NonNull<V>> {
        // SAFETY: a map pointer the loader relocated, and a key of the map's key type.
        NonNull::new(unsafe { bpf_map_lookup_elem(self.as_ptr(), core::ptr::from_ref(key).cast()) }.cast())
    }

    /// The value for `key`.
    ///
    /// # Safety
    /// Hash map values can change (or the slot be reused) under the reference; copy it out at once.
    #[inline(always)]
    pub unsafe fn get(&self, key: &K) -> Option<&V> {
        // SAFETY: the kernel returned a pointer to a live value; the caller copies it out.
        self.lookup(key).map(|p| unsafe { p.as_ref() })
    }

    #[inline(always)]
    pub fn get_ptr_mut(&self, key: &K) -> Option<*mut V> {
        self.lookup(key).map(NonNull::as_ptr)
    }

    #[inline(always)]
    pub fn insert(&self, key: &K, value: &V, flags: u64) -> Result<(), i64> {
        // SAFETY: as in `lookup`; the kernel copies the value.
        let ret = unsafe {
            bpf_map_update_elem(
                self.as_ptr(),
                core::ptr::from_ref(key).cast(),
                core::ptr::from_ref(value).cast_mut().cast(),
                flags,
            )
        };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    pub fn remove(&self, key: &K) -> Result<(), i64> {
        // SAFETY: as in `lookup`.
        let ret = unsafe { bpf_map_delete_elem(self.as_ptr(), core::ptr::from_ref(key).cast()) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }
}

pub type HashMap<K, V, const N: usize> = PinnedMap<{ bpf_map_type::BPF_MAP_TYPE_HASH as usize }, K, V, N, 0>;
pub type LruHashMap<K, V, const N: usize> = PinnedMap<{ bpf_map_type::BPF_MAP_TYPE_LRU_HASH as usize }, K, V, N, 0>;
pub type PerCpuHashMap<K, V, const N: usize> =
    PinnedMap<{ bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH as usize }, K, V, N, 0>;
pub type Array<V, const N: usize> = PinnedMap<{ bpf_map_type::BPF_MAP_TYPE_ARRAY as usize }, u32, V, N, 0>;
pub type PerCpuArray<V, const N: usize> = PinnedMap<{ bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as usize }, u32, V, N, 0>;
/// The kernel requires `BPF_F_NO_PREALLOC` on LPM tries.
pub type LpmTrie<K, V, const N: usize> =
    PinnedMap<{ bpf_map_type::BPF_MAP_TYPE_LPM_TRIE as usize }, LpmKey<K>, V, N, { BPF_F_NO_PREALLOC as usize }>;

/// An LPM trie key: the number of leading bits of `data` that count, then the data. The same
/// layout as `aya::maps::lpm_trie::Key` on the agent side.
#[repr(C, packed)]
pub struct LpmKey<K> {
    pub prefix_len: u32,
    pub data: K,
}

impl<K> LpmKey<K> {
    pub const fn new(prefix_len: u32, data: K) -> Self {
        Self { prefix_len, data }
    }
}
