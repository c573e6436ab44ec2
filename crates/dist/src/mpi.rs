//! MPI through Open MPI's shared library (`libmpi.so.40`), loaded when a run asks for it. The
//! handles below are Open MPI's ABI: `MPI_Comm`, `MPI_Datatype` and `MPI_Op` are pointers to
//! the library's predefined objects (`ompi_mpi_comm_world`, `ompi_mpi_float`, ...), and
//! `MPI_IN_PLACE` is `(void *) 1`. MPICH and its derivatives use integer handles instead; they
//! would be a second loader behind the same `Collective`.

use crate::Collective;
use dagr_onnx::error::{Error, Result};
use std::ffi::{c_char, c_int, c_void};

type Handle = *mut c_void;

/// `MPI_THREAD_FUNNELED`: only the main thread calls MPI (ONNX Runtime's and tract's threads
/// never do).
const THREAD_FUNNELED: c_int = 1;
const IN_PLACE: *mut c_void = std::ptr::without_provenance_mut(1);
/// `MPI_SUCCESS`.
const SUCCESS: c_int = 0;
/// The largest count one call takes (`int`); longer buffers go in pieces.
const MAX_COUNT: usize = 1 << 30;

fn err(message: impl std::fmt::Display) -> Error {
    Error::Runtime {
        backend: "mpi".into(),
        message: message.to_string(),
    }
}

type InitThread = unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char, c_int, *mut c_int) -> c_int;
type CommInt = unsafe extern "C" fn(Handle, *mut c_int) -> c_int;
type Allreduce = unsafe extern "C" fn(*const c_void, *mut c_void, c_int, Handle, Handle, Handle) -> c_int;
type Bcast = unsafe extern "C" fn(*mut c_void, c_int, Handle, c_int, Handle) -> c_int;
type Abort = unsafe extern "C" fn(Handle, c_int) -> c_int;
type Finalize = unsafe extern "C" fn() -> c_int;

/// MPI, initialized: the processes of `MPI_COMM_WORLD`. Finalized when dropped.
pub struct Mpi {
    allreduce: Allreduce,
    bcast: Bcast,
    abort: Abort,
    finalize: Finalize,
    world: Handle,
    float: Handle,
    double: Handle,
    sum: Handle,
    max: Handle,
    rank: usize,
    size: usize,
    /// Keeps the library loaded while the function pointers above are in use.
    _lib: libloading::os::unix::Library,
}

/// Where to find Open MPI: `DAGR_MPI_LIB`, else the system's `libmpi.so.40`.
fn library_names() -> Vec<String> {
    match std::env::var("DAGR_MPI_LIB") {
        Ok(p) => vec![p],
        Err(_) => vec!["libmpi.so.40".into(), "libmpi.so".into()],
    }
}

impl Mpi {
    /// Load Open MPI and initialize it (`MPI_Init_thread`, funneled). Call once per process,
    /// from the main thread, under a launcher (`mpirun -np N ...`).
    pub fn init() -> Result<Mpi> {
        // RTLD_GLOBAL: Open MPI's own components, which it loads next, resolve their symbols
        // against the library.
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
        let mut tried = Vec::new();
        let mut lib = None;
        for name in library_names() {
            // SAFETY: loading Open MPI runs its initializers, which only set up the library.
            match unsafe { libloading::os::unix::Library::open(Some(&name), flags) } {
                Ok(l) => {
                    lib = Some(l);
                    break;
                }
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        let lib = lib.ok_or_else(|| {
            err(format!(
                "cannot load Open MPI ({})\n  hint: install it (Debian: apt-get install openmpi-bin; scripts/setup.sh does), or set DAGR_MPI_LIB to its libmpi.so",
                tried.join("; ")
            ))
        })?;
        // SAFETY: each symbol has the C type Open MPI's mpi.h declares for it.
        unsafe {
            let func = |name: &[u8]| -> Result<*mut c_void> {
                let s: libloading::os::unix::Symbol<*mut c_void> = lib.get(name).map_err(|e| {
                    err(format!(
                        "the MPI library has no {}: {e} (Open MPI is needed)",
                        String::from_utf8_lossy(name)
                    ))
                })?;
                Ok(*s)
            };
            let init_thread: InitThread = std::mem::transmute::<*mut c_void, InitThread>(func(b"MPI_Init_thread\0")?);
            let comm_rank: CommInt = std::mem::transmute::<*mut c_void, CommInt>(func(b"MPI_Comm_rank\0")?);
            let comm_size: CommInt = std::mem::transmute::<*mut c_void, CommInt>(func(b"MPI_Comm_size\0")?);
            let allreduce: Allreduce = std::mem::transmute::<*mut c_void, Allreduce>(func(b"MPI_Allreduce\0")?);
            let bcast: Bcast = std::mem::transmute::<*mut c_void, Bcast>(func(b"MPI_Bcast\0")?);
            let abort: Abort = std::mem::transmute::<*mut c_void, Abort>(func(b"MPI_Abort\0")?);
            let finalize: Finalize = std::mem::transmute::<*mut c_void, Finalize>(func(b"MPI_Finalize\0")?);
            // The predefined objects: the symbol's address is the handle.
            let world = func(b"ompi_mpi_comm_world\0")?;
            let float = func(b"ompi_mpi_float\0")?;
            let double = func(b"ompi_mpi_double\0")?;
            let sum = func(b"ompi_mpi_op_sum\0")?;
            let max = func(b"ompi_mpi_op_max\0")?;
            let mut provided: c_int = 0;
            let rc = init_thread(
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                THREAD_FUNNELED,
                &mut provided,
            );
            if rc != SUCCESS {
                return Err(err(format!("MPI_Init_thread failed (error {rc})")));
            }
            let (mut rank, mut size): (c_int, c_int) = (0, 0);
            if comm_rank(world, &mut rank) != SUCCESS || comm_size(world, &mut size) != SUCCESS {
                return Err(err("cannot read this process's rank in MPI_COMM_WORLD"));
            }
            Ok(Mpi {
                allreduce,
                bcast,
                abort,
                finalize,
                world,
                float,
                double,
                sum,
                max,
                rank: rank.max(0) as usize,
                size: size.max(1) as usize,
                _lib: lib,
            })
        }
    }

    /// End every process of the run with `code` (`MPI_Abort`): what a process that fails alone
    /// does, so that the others do not wait for it forever.
    pub fn abort(&self, code: i32) -> ! {
        // SAFETY: `world` is the library's MPI_COMM_WORLD; MPI_Abort does not return.
        unsafe {
            (self.abort)(self.world, code);
        }
        std::process::exit(code)
    }

    /// All-reduce `len` elements of `elem` bytes at `ptr` in place, in pieces of `MAX_COUNT`.
    fn allreduce_in_place(&self, ptr: *mut c_void, len: usize, elem: usize, dtype: Handle, op: Handle) -> Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_COUNT);
            // SAFETY: `ptr` points to `len` elements of `elem` bytes; MPI writes `n` of them
            // from offset `done`.
            let rc = unsafe {
                (self.allreduce)(
                    IN_PLACE,
                    ptr.cast::<u8>().add(done * elem).cast(),
                    n as c_int,
                    dtype,
                    op,
                    self.world,
                )
            };
            if rc != SUCCESS {
                return Err(err(format!("MPI_Allreduce failed (error {rc})")));
            }
            done += n;
        }
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.allreduce_in_place(buf.as_mut_ptr().cast(), buf.len(), 4, self.float, self.sum)
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.allreduce_in_place(buf.as_mut_ptr().cast(), buf.len(), 8, self.double, self.sum)
    }
    fn max_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.allreduce_in_place(buf.as_mut_ptr().cast(), buf.len(), 8, self.double, self.max)
    }
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        for piece in buf.chunks_mut(MAX_COUNT) {
            // SAFETY: `piece` is a valid buffer of `piece.len()` floats on every process.
            let rc = unsafe {
                (self.bcast)(
                    piece.as_mut_ptr().cast(),
                    piece.len() as c_int,
                    self.float,
                    0,
                    self.world,
                )
            };
            if rc != SUCCESS {
                return Err(err(format!("MPI_Bcast failed (error {rc})")));
            }
        }
        Ok(())
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        // SAFETY: initialized in `init`, finalized once, here.
        unsafe {
            (self.finalize)();
        }
    }
}
