//! The sequence service over gRPC.

use imstate_proto::v1 as pb;
use imstate_proto::v1::sequence_server::Sequence;
use imstate_seq::{Ids, NamespaceDef};
use tonic::{Request, Response, Status};

use super::status_from;
use imstate_node::seqstore::namespace_name;
use imstate_node::sequences::Sequences;

/// The sequence service.
pub struct SequenceService {
    store: Sequences,
}

impl SequenceService {
    /// Serves `store` (embedded or cluster).
    pub fn new(store: Sequences) -> Self {
        Self { store }
    }

    /// Route information for a reply: the version always, the table when the client is stale.
    fn route(&self, client_version: u64) -> Option<pb::RouteInfo> {
        Some(self.store.route_info(client_version))
    }
}

/// The ids of a request: its `keys` when it has any (a keyed namespace), else its `ids`.
fn ids_of<'a>(ids: &'a [u64], keys: &'a [Vec<u8>]) -> Result<Ids<'a>, Status> {
    match (ids.is_empty(), keys.is_empty()) {
        (false, false) => Err(Status::invalid_argument(
            "a request has either `ids` (a numeric namespace) or `keys` (a keyed one), not both",
        )),
        (true, false) => Ok(Ids::Keys(keys)),
        _ => Ok(Ids::Numeric(ids)),
    }
}

fn namespace_from_pb(namespace: pb::Namespace) -> Result<NamespaceDef, Status> {
    let defaults = NamespaceDef::default_namespace();
    let keys = namespace
        .keys
        .parse()
        .map_err(|error: imstate_seq::SeqError| Status::invalid_argument(error.to_string()))?;
    Ok(NamespaceDef {
        name: namespace.name,
        id_lo: namespace.id_lo,
        id_hi: namespace.id_hi,
        section_size: if namespace.section_size == 0 {
            defaults.section_size
        } else {
            namespace.section_size
        },
        step: if namespace.step == 0 {
            defaults.step
        } else {
            namespace.step
        },
        keys,
    })
}

#[tonic::async_trait]
impl Sequence for SequenceService {
    async fn next(
        &self,
        request: Request<pb::NextRequest>,
    ) -> Result<Response<pb::NextReply>, Status> {
        let request = request.into_inner();
        let seq = self
            .store
            .next(namespace_name(&request.namespace), request.id)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::NextReply {
            seq,
            route: self.route(request.route_version),
        }))
    }

    async fn next_batch(
        &self,
        request: Request<pb::NextBatchRequest>,
    ) -> Result<Response<pb::SeqBatchReply>, Status> {
        let request = request.into_inner();
        let seqs = self
            .store
            .next_batch(
                namespace_name(&request.namespace),
                ids_of(&request.ids, &request.keys)?,
            )
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::SeqBatchReply {
            seqs,
            route: self.route(request.route_version),
        }))
    }

    async fn next_range(
        &self,
        request: Request<pb::NextRangeRequest>,
    ) -> Result<Response<pb::NextRangeReply>, Status> {
        let request = request.into_inner();
        let last = self
            .store
            .next_range_batch(
                namespace_name(&request.namespace),
                ids_of(&request.ids, &request.keys)?,
                request.count,
            )
            .await
            .map_err(status_from)?;
        // Served ranges are non-empty (count >= 1), so `last - count + 1` cannot underflow.
        let first = last
            .iter()
            .map(|&last| last - (request.count - 1))
            .collect();
        Ok(Response::new(pb::NextRangeReply {
            first,
            last,
            route: self.route(request.route_version),
        }))
    }

    async fn current(
        &self,
        request: Request<pb::CurrentRequest>,
    ) -> Result<Response<pb::CurrentReply>, Status> {
        let request = request.into_inner();
        let seq = self
            .store
            .current_batch(namespace_name(&request.namespace), &[request.id])
            .await
            .map_err(status_from)?[0];
        Ok(Response::new(pb::CurrentReply {
            seq,
            route: self.route(request.route_version),
        }))
    }

    async fn current_batch(
        &self,
        request: Request<pb::CurrentBatchRequest>,
    ) -> Result<Response<pb::SeqBatchReply>, Status> {
        let request = request.into_inner();
        let seqs = self
            .store
            .current_batch(
                namespace_name(&request.namespace),
                ids_of(&request.ids, &request.keys)?,
            )
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::SeqBatchReply {
            seqs,
            route: self.route(request.route_version),
        }))
    }

    async fn set_min_seq(
        &self,
        request: Request<pb::SetMinSeqRequest>,
    ) -> Result<Response<pb::SetMinSeqReply>, Status> {
        let request = request.into_inner();
        self.store
            .set_min_seqs(
                namespace_name(&request.namespace),
                ids_of(&request.ids, &request.keys)?,
                &request.min_seqs,
            )
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::SetMinSeqReply {
            route: self.route(request.route_version),
        }))
    }

    async fn get_min_seq(
        &self,
        request: Request<pb::GetMinSeqRequest>,
    ) -> Result<Response<pb::SeqBatchReply>, Status> {
        let request = request.into_inner();
        let seqs = self
            .store
            .min_seqs(
                namespace_name(&request.namespace),
                ids_of(&request.ids, &request.keys)?,
            )
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::SeqBatchReply {
            seqs,
            route: self.route(request.route_version),
        }))
    }

    async fn create_namespace(
        &self,
        request: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::CreateNamespaceReply>, Status> {
        let Some(namespace) = request.into_inner().namespace else {
            return Err(Status::invalid_argument("namespace is required"));
        };
        let def = self
            .store
            .create_namespace(namespace_from_pb(namespace)?)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::CreateNamespaceReply {
            namespace: Some(imstate_node::sequences::namespace_to_pb(def)),
            route: self.route(0),
        }))
    }

    async fn list_namespaces(
        &self,
        _request: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesReply>, Status> {
        Ok(Response::new(self.store.namespaces_reply()))
    }
}
