//! Measures the two ways this kernel offers to track which pages of a region were written
//! (docs/far-memory.md, "Dirty tracking"): synchronous userfaultfd WP faults, and
//! `UFFD_FEATURE_WP_ASYNC` with the `PAGEMAP_SCAN` ioctl. Each round write-protects a
//! populated anonymous region, writes one byte to every page, and learns which pages were
//! written; the cost per page is reported.
//!
//! `cargo run --release -p faultline-client --example far_wp_measure [PAGES] [ROUNDS]`

use std::time::{Duration, Instant};

use faultline_client::backing::GuestMemory;
use faultline_client::uffd::{
    Event, EventBuffer, Features, PageRegion, Pagemap, Readiness, RegisterModes, StopSignal, Uffd,
    UffdOptions,
};

const PAGE: usize = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let pages: usize = args.next().map_or(Ok(16384), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let sync = measure_sync(pages, rounds)?;
    let asynchronous = measure_async(pages, rounds)?;
    println!(
        "{pages} pages, {rounds} rounds, best round per page:\n  synchronous WP faults: \
         {:.2} us\n  WP_ASYNC writes: {:.2} us + PAGEMAP_SCAN: {:.2} us = {:.2} us",
        per_page(sync, pages),
        per_page(asynchronous.0, pages),
        per_page(asynchronous.1, pages),
        per_page(asynchronous.0 + asynchronous.1, pages),
    );
    Ok(())
}

fn per_page(d: Duration, pages: usize) -> f64 {
    d.as_secs_f64() * 1e6 / pages as f64
}

/// Memory of `pages` pages, every page populated, registered WP on `uffd`.
fn region(uffd: &Uffd, pages: usize) -> Result<GuestMemory, Box<dyn std::error::Error>> {
    let mem = GuestMemory::anonymous(pages * PAGE)?;
    for p in 0..pages {
        mem.guest().write(p * PAGE, &[1])?;
    }
    // SAFETY: `mem` is guest memory of this example, no Rust object lives in it, and it
    // outlives the registration (the uffd is dropped first by the callers).
    unsafe { uffd.register(mem.host_addr(), mem.len(), RegisterModes::WP)? };
    Ok(mem)
}

/// Best round of: protect, write every page (each write a WP fault served by a thread that
/// records the page and unprotects it).
fn measure_sync(pages: usize, rounds: usize) -> Result<Duration, Box<dyn std::error::Error>> {
    let uffd = Uffd::open_with(UffdOptions {
        wanted: Features::empty(),
        required: Features::empty(),
    })?;
    let mem = region(&uffd, pages)?;
    let (base, len) = (mem.host_addr(), mem.len());
    let stop = StopSignal::new()?;
    let mut best = Duration::MAX;
    std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
        let server = s.spawn(|| {
            let mut buf = EventBuffer::new(64);
            let mut events = Vec::new();
            let mut written = 0u64;
            while uffd.wait(None, Some(&stop)).ok() == Some(Readiness::Events) {
                events.clear();
                uffd.read_events(&mut buf, &mut events).expect("read");
                for e in &events {
                    if let Event::Pagefault { address, .. } = *e {
                        written += 1;
                        let page = address & !(PAGE - 1);
                        uffd.writeprotect(page, PAGE, false, false)
                            .expect("unprotect");
                    }
                }
            }
            written
        });
        for _ in 0..rounds {
            uffd.writeprotect(base, len, true, false)?;
            let t = Instant::now();
            for p in 0..pages {
                mem.guest().write(p * PAGE, &[2])?;
            }
            best = best.min(t.elapsed());
        }
        stop.stop();
        let written = server.join().expect("server thread");
        assert_eq!(written, (pages * rounds) as u64, "every write faulted once");
        Ok(())
    })?;
    drop(uffd);
    Ok(best)
}

/// Best round of: protect (by the previous scan), write every page (no faults), then one
/// `PAGEMAP_SCAN` that reports the written pages and protects them again. Returns the writes'
/// time and the scan's.
fn measure_async(
    pages: usize,
    rounds: usize,
) -> Result<(Duration, Duration), Box<dyn std::error::Error>> {
    let uffd = Uffd::open_with(UffdOptions {
        wanted: Features::empty(),
        required: Features::WP_ASYNC,
    })?;
    let mem = region(&uffd, pages)?;
    let (base, len) = (mem.host_addr(), mem.len());
    let pagemap = Pagemap::open()?;
    uffd.writeprotect(base, len, true, false)?;
    let mut out = vec![PageRegion::default(); 1024];
    let mut best = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        let t = Instant::now();
        for p in 0..pages {
            mem.guest().write(p * PAGE, &[3])?;
        }
        let writes = t.elapsed();
        let t = Instant::now();
        let mut written = 0;
        let mut at = base;
        while at < base + len {
            let (n, end) = pagemap.take_written(at, base + len, &mut out)?;
            written += out[..n]
                .iter()
                .map(|r| (r.end - r.start) as usize / PAGE)
                .sum::<usize>();
            if n < out.len() && end >= base + len {
                break;
            }
            at = end;
        }
        let scan = t.elapsed();
        assert_eq!(written, pages, "every page reported written");
        if writes + scan < best.0.saturating_add(best.1) {
            best = (writes, scan);
        }
    }
    drop(uffd);
    Ok(best)
}
