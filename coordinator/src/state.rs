//! The replicated coordinator state and the one function that changes it.
//!
//! Every coordinator replica applies the same committed [`pb::ClusterCommand`]s in the same order, so they
//! all hold the same [`pb::ClusterState`]: membership of workers, the shard map with each shard's replicas,
//! checkpoints and the served tip. Kept free of I/O so it can be read (and tested) on its own.

use chainidx_proto as pb;
use pb::cluster_command::Command;

/// Applies one committed command. Commands carry intent, not whole states, so two writers (the driver and a
/// registering worker) never overwrite each other's changes.
pub fn apply(state: &mut pb::ClusterState, command: &pb::ClusterCommand) {
    let Some(command) = &command.command else {
        return;
    };
    match command {
        Command::RegisterWorker(worker) => {
            match state.workers.iter_mut().find(|w| w.name == worker.name) {
                Some(known) => {
                    known.grpc_addr = worker.grpc_addr.clone();
                    known.generation += 1;
                }
                None => state.workers.push(pb::WorkerRecord {
                    generation: 1,
                    ..worker.clone()
                }),
            }
        }
        Command::Plan(plan) => {
            // Planned once: a new leader re-proposing a plan must not reset checkpoints or owners.
            if state.planned {
                return;
            }
            state.planned = true;
            state.shards = plan.shards.clone();
            state.has_tip = true;
            state.tip = plan.tip;
            state.replication = plan.replication.max(1);
        }
        Command::SetReplicas(change) => {
            if let Some(shard) = state.shards.get_mut(change.shard_id as usize) {
                shard.replicas = change.replicas.clone();
                shard.joining = change.joining.clone();
                shard.epoch += 1;
            }
        }
        Command::Progress(progress) => {
            for status in &progress.statuses {
                if let Some(shard) = state.shards.get_mut(status.shard_id as usize) {
                    shard.status = Some(status.clone());
                }
            }
        }
        Command::Tip(tip) => {
            state.has_tip = true;
            state.tip = tip.tip;
            state.following = tip.following;
            state.backfill_complete = tip.backfill_complete;
            state.source_tip = tip.source_tip;
        }
        Command::Halt(reason) => state.halted = reason.clone(),
    }
}

/// The shard's range and checkpoint, with defaults for a shard nobody reported on yet.
pub fn shard_status(shard: &pb::ShardRecord) -> pb::ShardStatus {
    shard.status.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(name: &str, addr: &str) -> pb::ClusterCommand {
        pb::ClusterCommand {
            command: Some(Command::RegisterWorker(pb::WorkerRecord {
                name: name.into(),
                grpc_addr: addr.into(),
                generation: 0,
            })),
        }
    }

    #[test]
    fn registering_again_bumps_the_generation_and_keeps_the_name() {
        let mut state = pb::ClusterState::default();
        apply(&mut state, &register("a", "127.0.0.1:1"));
        apply(&mut state, &register("b", "127.0.0.1:2"));
        apply(&mut state, &register("a", "127.0.0.1:3"));
        assert_eq!(state.workers.len(), 2);
        assert_eq!(state.workers[0].grpc_addr, "127.0.0.1:3");
        assert_eq!(state.workers[0].generation, 2);
        assert_eq!(state.workers[1].generation, 1);
    }

    #[test]
    fn a_second_plan_changes_nothing() {
        let mut state = pb::ClusterState::default();
        let plan = |tip| pb::ClusterCommand {
            command: Some(Command::Plan(pb::PlanShards {
                shards: vec![pb::ShardRecord {
                    replicas: vec!["a".into()],
                    ..Default::default()
                }],
                tip,
                replication: 1,
            })),
        };
        apply(&mut state, &plan(10));
        apply(
            &mut state,
            &pb::ClusterCommand {
                command: Some(Command::SetReplicas(pb::ShardReplicas {
                    shard_id: 0,
                    replicas: vec!["b".into()],
                    joining: vec![],
                })),
            },
        );
        apply(&mut state, &plan(20));
        assert_eq!(state.tip, 10);
        assert_eq!(state.shards[0].replicas, vec!["b".to_string()]);
        assert_eq!(state.shards[0].epoch, 1);
    }
}
