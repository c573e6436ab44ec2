//! Collectives across the processes of a data-parallel run: the extension point (`Collective`),
//! one process alone (`Alone`), and MPI (`mpi::Mpi`, the system's Open MPI loaded at run time,
//! with the `mpi` feature). The training loop sums gradients and checks that the processes hold
//! the same parameters through this trait only; NCCL or another engine would be one more
//! implementation (see the README).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

#[cfg(feature = "mpi")]
pub mod mpi;

use dagr_onnx::error::Result;

/// The processes of one run, and what they do together. Every process calls the same methods
/// in the same order with buffers of the same lengths; each call returns once all have made it.
pub trait Collective {
    /// This process's index, 0 to `size() - 1`; process 0 writes the run's files.
    fn rank(&self) -> usize;
    /// How many processes run.
    fn size(&self) -> usize;
    /// Replace each element by its sum over the processes; every process gets the same sums.
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replace each element by its maximum over the processes.
    fn max_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replace `buf` by process 0's.
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()>;
}

/// One process: every collective is the identity.
pub struct Alone;

impl Collective for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn max_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// Whether this process was started by an MPI launcher (`mpirun`, `srun`): the environment
/// variables Open MPI, MPICH / PMI and PMIx set in every process they start.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// This process's index among the processes of its node (which GPU it binds), from the
/// launcher's environment; 0 when none says.
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}
