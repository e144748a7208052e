//! The proxy's memory allocator: jemalloc.
//!
//! A sidecar's memory follows its connections: with thousands of keep-alive clients, idle
//! HTTP/1.1 connections hibernate and free their buffers ([`crate::http::hibernate`]). glibc's
//! malloc keeps such holes between the connections' live allocations (RSS stays at the peak);
//! jemalloc keeps each size class on pages of its own and its background thread returns pages
//! that stayed free for a second (`dirty_decay_ms:1000`, set at build time in
//! `.cargo/config.toml`). Per request, HTTP/1.1 allocates and frees a ~5 KiB future and an 8 KiB
//! read buffer: objects of 2-14 KiB come from 64 KiB slabs and each size class keeps 64 freed
//! objects per thread (`slab_sizes`, `tcache_nslots_small_min`), so that under load they are
//! reused instead of slabs being made and unmade. Binaries install it with `#[global_allocator]`:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: weft_proxy::alloc::Allocator = weft_proxy::alloc::ALLOCATOR;
//! ```

/// The allocator type.
pub type Allocator = tikv_jemallocator::Jemalloc;

/// The allocator, for `#[global_allocator]`.
pub const ALLOCATOR: Allocator = tikv_jemallocator::Jemalloc;
