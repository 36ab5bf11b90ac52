//! The preparer: makes the next segment's file ready before the flusher needs it.
//!
//! Rotating to a new segment used to stop the writer for the file's creation (or a recycled
//! file's rename), its allocation and the directory sync that makes its name durable:
//! 0.5–0.9 ms on this project's test disk, once per segment, with every record that arrived
//! meanwhile waiting. The flusher now asks for segment `n + 1` as soon as it opens segment
//! `n`; this thread makes that file and syncs the directory, and the next rotation only
//! takes it. When the file is not ready (or could not be made) the flusher makes it itself,
//! exactly as before, so errors surface where they always did. Both make it with
//! `segment::make_segment_file`, which is why neither imports the other.
//!
//! On disk a prepared file is `seg-<n+1>.log` holding no batch of its own (zeros, or a
//! recycled file's old bytes, whose headers name another segment). Recovery recognises it
//! as a spare: see [`super::recover`].

use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::io::StorageFile;
use super::segment::{make_segment_file, PrepareError};
use super::state::Inner;

#[derive(Default)]
struct State {
    /// Asked for and not started.
    wanted: Option<u64>,
    /// Being made now.
    busy: Option<u64>,
    ready: Option<(u64, Arc<dyn StorageFile>)>,
    stop: bool,
}

#[derive(Default)]
struct Slot {
    state: Mutex<State>,
    cv: Condvar,
}

/// The flusher's handle on the preparer thread.
pub(crate) struct Preparer {
    slot: Arc<Slot>,
    thread: Option<JoinHandle<()>>,
    /// Without a thread by choice (`Options::segment_preparer_thread` off): `request`
    /// makes the file at once, on the flusher's thread.
    inline: Option<Arc<Inner>>,
}

impl Preparer {
    /// Starts the thread. If it cannot be spawned the flusher makes every file itself.
    pub fn start(inner: Arc<Inner>) -> Preparer {
        let slot = Arc::new(Slot::default());
        if !inner.opts.segment_preparer_thread {
            return Preparer { slot, thread: None, inline: Some(inner) };
        }
        let slot2 = slot.clone();
        let thread = std::thread::Builder::new()
            .name("churnlog-preparer".into())
            .spawn(move || run(&inner, &slot2))
            .map_err(|e| tracing::warn!(error = %e, "no segment preparer thread; rotation makes files inline"))
            .ok();
        Preparer { slot, thread, inline: None }
    }

    /// Asks for segment `id`'s file to be made ready.
    pub fn request(&self, id: u64) {
        if let Some(inner) = &self.inline {
            prepare(inner, &self.slot, id);
            return;
        }
        if self.thread.is_none() {
            return;
        }
        let mut st = self.slot.state.lock();
        debug_assert!(st.ready.is_none() && st.busy.is_none(), "one spare at a time");
        st.wanted = Some(id);
        self.slot.cv.notify_all();
    }

    /// The prepared file of segment `id`, waiting for it if it is being made right now
    /// (that wait is never longer than making it here). `None`: the caller makes it.
    pub fn take(&self, id: u64) -> Option<Arc<dyn StorageFile>> {
        let mut st = self.slot.state.lock();
        while st.busy == Some(id) {
            self.slot.cv.wait(&mut st);
        }
        if st.wanted == Some(id) {
            // Not started: the caller makes it now rather than wait for this thread.
            st.wanted = None;
        }
        match st.ready.take() {
            Some((ready, file)) if ready == id => Some(file),
            other => {
                debug_assert!(other.is_none(), "a spare for another segment");
                st.ready = other;
                None
            }
        }
    }

    /// Stops the thread and returns the prepared file nobody took, if any.
    pub fn stop(&mut self) -> Option<(u64, Arc<dyn StorageFile>)> {
        {
            let mut st = self.slot.state.lock();
            st.stop = true;
            self.slot.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.slot.state.lock().ready.take()
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn run(inner: &Inner, slot: &Slot) {
    loop {
        let id = {
            let mut st = slot.state.lock();
            loop {
                if st.stop {
                    return;
                }
                if let Some(id) = st.wanted.take() {
                    st.busy = Some(id);
                    break id;
                }
                slot.cv.wait(&mut st);
            }
        };
        prepare(inner, slot, id);
    }
}

/// Makes segment `id`'s file and leaves it in `slot` (on the preparer's thread, or on
/// the flusher's when there is none by choice).
fn prepare(inner: &Inner, slot: &Slot, id: u64) {
    let made = make_segment_file(inner, id);
    if let Err(PrepareError::DirSync(e)) = &made {
        // Never retried (the flusher would fsync the directory again at rotation).
        inner.poison(format!("fsync directory for segment {id}: {e}"));
    }
    let mut st = slot.state.lock();
    st.busy = None;
    match made {
        Ok(file) => st.ready = Some((id, file)),
        // The flusher makes the file itself at rotation and reports what fails there.
        Err(e) => tracing::debug!(segment = id, error = %e, "spare segment not prepared"),
    }
    slot.cv.notify_all();
}
