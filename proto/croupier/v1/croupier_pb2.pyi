from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SliceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLICE_KIND_UNSPECIFIED: _ClassVar[SliceKind]
    SLICE_KIND_DATA: _ClassVar[SliceKind]
    SLICE_KIND_END_OF_DATA: _ClassVar[SliceKind]
SLICE_KIND_UNSPECIFIED: SliceKind
SLICE_KIND_DATA: SliceKind
SLICE_KIND_END_OF_DATA: SliceKind

class GetVersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetVersionResponse(_message.Message):
    __slots__ = ("server_version", "api_version")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    api_version: str
    def __init__(self, server_version: _Optional[str] = ..., api_version: _Optional[str] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job", "dataset_remote", "dataset_fingerprint", "sampler_fingerprint", "global_batch", "policy", "policy_json", "seed", "num_samples", "num_clusters", "selection", "world_size", "sources", "token_schedule")
    JOB_FIELD_NUMBER: _ClassVar[int]
    DATASET_REMOTE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    job: str
    dataset_remote: str
    dataset_fingerprint: str
    sampler_fingerprint: str
    global_batch: int
    policy: str
    policy_json: str
    seed: int
    num_samples: int
    num_clusters: int
    selection: str
    world_size: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceInfo]
    token_schedule: str
    def __init__(self, job: _Optional[str] = ..., dataset_remote: _Optional[str] = ..., dataset_fingerprint: _Optional[str] = ..., sampler_fingerprint: _Optional[str] = ..., global_batch: _Optional[int] = ..., policy: _Optional[str] = ..., policy_json: _Optional[str] = ..., seed: _Optional[int] = ..., num_samples: _Optional[int] = ..., num_clusters: _Optional[int] = ..., selection: _Optional[str] = ..., world_size: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceInfo, _Mapping]]] = ..., token_schedule: _Optional[str] = ...) -> None: ...

class SourceInfo(_message.Message):
    __slots__ = ("name", "remote", "fingerprint", "offset", "size", "selection", "num_clusters", "weight", "policy", "clip", "draws", "exhausted_at", "active_clusters", "tokens_dealt", "tokens_target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    NUM_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    DRAWS_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DEALT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    remote: str
    fingerprint: str
    offset: int
    size: int
    selection: str
    num_clusters: int
    weight: float
    policy: str
    clip: int
    draws: int
    exhausted_at: int
    active_clusters: int
    tokens_dealt: int
    tokens_target: int
    def __init__(self, name: _Optional[str] = ..., remote: _Optional[str] = ..., fingerprint: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., selection: _Optional[str] = ..., num_clusters: _Optional[int] = ..., weight: _Optional[float] = ..., policy: _Optional[str] = ..., clip: _Optional[int] = ..., draws: _Optional[int] = ..., exhausted_at: _Optional[int] = ..., active_clusters: _Optional[int] = ..., tokens_dealt: _Optional[int] = ..., tokens_target: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("job", "rank", "world_size", "global_batch", "resume_token", "client_version", "sampler_state")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_STATE_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    global_batch: int
    resume_token: str
    client_version: str
    sampler_state: bytes
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., global_batch: _Optional[int] = ..., resume_token: _Optional[str] = ..., client_version: _Optional[str] = ..., sampler_state: _Optional[bytes] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("job", "next_step", "per_rank_batch", "max_lookahead", "max_lag")
    JOB_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    PER_RANK_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    next_step: int
    per_rank_batch: int
    max_lookahead: int
    max_lag: int
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ..., next_step: _Optional[int] = ..., per_rank_batch: _Optional[int] = ..., max_lookahead: _Optional[int] = ..., max_lag: _Optional[int] = ...) -> None: ...

class Slice(_message.Message):
    __slots__ = ("step", "ids", "kind", "packed_ids", "packed_token_spans")
    STEP_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PACKED_IDS_FIELD_NUMBER: _ClassVar[int]
    PACKED_TOKEN_SPANS_FIELD_NUMBER: _ClassVar[int]
    step: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    kind: SliceKind
    packed_ids: bytes
    packed_token_spans: bytes
    def __init__(self, step: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., kind: _Optional[_Union[SliceKind, str]] = ..., packed_ids: _Optional[bytes] = ..., packed_token_spans: _Optional[bytes] = ...) -> None: ...

class StreamSlicesRequest(_message.Message):
    __slots__ = ("job", "rank", "world_size", "start_step", "lookahead", "step_stride", "step_offset", "stop_step", "read_only", "packed_ids")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    STEP_STRIDE_FIELD_NUMBER: _ClassVar[int]
    STEP_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STOP_STEP_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    PACKED_IDS_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    start_step: int
    lookahead: int
    step_stride: int
    step_offset: int
    stop_step: int
    read_only: bool
    packed_ids: bool
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., start_step: _Optional[int] = ..., lookahead: _Optional[int] = ..., step_stride: _Optional[int] = ..., step_offset: _Optional[int] = ..., stop_step: _Optional[int] = ..., read_only: _Optional[bool] = ..., packed_ids: _Optional[bool] = ...) -> None: ...

class StreamSlicesResponse(_message.Message):
    __slots__ = ("slices",)
    SLICES_FIELD_NUMBER: _ClassVar[int]
    slices: _containers.RepeatedCompositeFieldContainer[Slice]
    def __init__(self, slices: _Optional[_Iterable[_Union[Slice, _Mapping]]] = ...) -> None: ...

class GetSliceRequest(_message.Message):
    __slots__ = ("job", "rank", "world_size", "step", "packed_ids")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PACKED_IDS_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    step: int
    packed_ids: bool
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., step: _Optional[int] = ..., packed_ids: _Optional[bool] = ...) -> None: ...

class GetSliceResponse(_message.Message):
    __slots__ = ("slice",)
    SLICE_FIELD_NUMBER: _ClassVar[int]
    slice: Slice
    def __init__(self, slice: _Optional[_Union[Slice, _Mapping]] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("job", "rank", "world_size", "next_step", "step_stride", "step_offset")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_STRIDE_FIELD_NUMBER: _ClassVar[int]
    STEP_OFFSET_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    next_step: int
    step_stride: int
    step_offset: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., next_step: _Optional[int] = ..., step_stride: _Optional[int] = ..., step_offset: _Optional[int] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("slowest_step", "fastest_step")
    SLOWEST_STEP_FIELD_NUMBER: _ClassVar[int]
    FASTEST_STEP_FIELD_NUMBER: _ClassVar[int]
    slowest_step: int
    fastest_step: int
    def __init__(self, slowest_step: _Optional[int] = ..., fastest_step: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("job", "step", "include_sampler_state")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SAMPLER_STATE_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    include_sampler_state: bool
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., include_sampler_state: _Optional[bool] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("token", "step", "sampler_state")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_STATE_FIELD_NUMBER: _ClassVar[int]
    token: str
    step: int
    sampler_state: bytes
    def __init__(self, token: _Optional[str] = ..., step: _Optional[int] = ..., sampler_state: _Optional[bytes] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("include_clusters",)
    INCLUDE_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    include_clusters: bool
    def __init__(self, include_clusters: _Optional[bool] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "next_step", "delivered_step", "seconds_since_seen", "connected", "live")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_STEP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    next_step: int
    delivered_step: int
    seconds_since_seen: float
    connected: bool
    live: bool
    def __init__(self, rank: _Optional[int] = ..., next_step: _Optional[int] = ..., delivered_step: _Optional[int] = ..., seconds_since_seen: _Optional[float] = ..., connected: _Optional[bool] = ..., live: _Optional[bool] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("job", "generated_step", "durable_step", "slowest_step", "fastest_step", "ranks", "active_clusters", "clip", "cluster_sizes", "cluster_draws", "cluster_passes", "cluster_clipped_at", "checkpoint_error", "checkpoint_failures", "generated_mark", "sessions", "open_streams", "adapt", "tokens_counted", "tokens_drawn", "tokens_since_step", "cluster_tokens", "event_log_records", "event_log_failures", "event_log_start")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATED_STEP_FIELD_NUMBER: _ClassVar[int]
    DURABLE_STEP_FIELD_NUMBER: _ClassVar[int]
    SLOWEST_STEP_FIELD_NUMBER: _ClassVar[int]
    FASTEST_STEP_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_SIZES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_DRAWS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_PASSES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_CLIPPED_AT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ERROR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    GENERATED_MARK_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    OPEN_STREAMS_FIELD_NUMBER: _ClassVar[int]
    ADAPT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_COUNTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DRAWN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOG_RECORDS_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOG_FAILURES_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOG_START_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    generated_step: int
    durable_step: int
    slowest_step: int
    fastest_step: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    active_clusters: int
    clip: int
    cluster_sizes: _containers.RepeatedScalarFieldContainer[int]
    cluster_draws: _containers.RepeatedScalarFieldContainer[int]
    cluster_passes: _containers.RepeatedScalarFieldContainer[int]
    cluster_clipped_at: _containers.RepeatedScalarFieldContainer[int]
    checkpoint_error: str
    checkpoint_failures: int
    generated_mark: int
    sessions: _containers.RepeatedCompositeFieldContainer[SessionStatus]
    open_streams: int
    adapt: AdaptStatus
    tokens_counted: bool
    tokens_drawn: int
    tokens_since_step: int
    cluster_tokens: _containers.RepeatedScalarFieldContainer[int]
    event_log_records: int
    event_log_failures: int
    event_log_start: str
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ..., generated_step: _Optional[int] = ..., durable_step: _Optional[int] = ..., slowest_step: _Optional[int] = ..., fastest_step: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ..., active_clusters: _Optional[int] = ..., clip: _Optional[int] = ..., cluster_sizes: _Optional[_Iterable[int]] = ..., cluster_draws: _Optional[_Iterable[int]] = ..., cluster_passes: _Optional[_Iterable[int]] = ..., cluster_clipped_at: _Optional[_Iterable[int]] = ..., checkpoint_error: _Optional[str] = ..., checkpoint_failures: _Optional[int] = ..., generated_mark: _Optional[int] = ..., sessions: _Optional[_Iterable[_Union[SessionStatus, _Mapping]]] = ..., open_streams: _Optional[int] = ..., adapt: _Optional[_Union[AdaptStatus, _Mapping]] = ..., tokens_counted: _Optional[bool] = ..., tokens_drawn: _Optional[int] = ..., tokens_since_step: _Optional[int] = ..., cluster_tokens: _Optional[_Iterable[int]] = ..., event_log_records: _Optional[int] = ..., event_log_failures: _Optional[int] = ..., event_log_start: _Optional[str] = ...) -> None: ...

class StepLosses(_message.Message):
    __slots__ = ("step", "losses", "present")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    step: int
    losses: _containers.RepeatedScalarFieldContainer[float]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, step: _Optional[int] = ..., losses: _Optional[_Iterable[float]] = ..., present: _Optional[_Iterable[bool]] = ...) -> None: ...

class ReportLossRequest(_message.Message):
    __slots__ = ("job", "rank", "world_size", "steps")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    steps: _containers.RepeatedCompositeFieldContainer[StepLosses]
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[StepLosses, _Mapping]]] = ...) -> None: ...

class LossRefusal(_message.Message):
    __slots__ = ("step", "rule", "message")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    rule: str
    message: str
    def __init__(self, step: _Optional[int] = ..., rule: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReportLossResponse(_message.Message):
    __slots__ = ("accepted", "refused")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    refused: _containers.RepeatedCompositeFieldContainer[LossRefusal]
    def __init__(self, accepted: _Optional[int] = ..., refused: _Optional[_Iterable[_Union[LossRefusal, _Mapping]]] = ...) -> None: ...

class WeightChange(_message.Message):
    __slots__ = ("step", "origin", "kind", "max_ratio")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_RATIO_FIELD_NUMBER: _ClassVar[int]
    step: int
    origin: str
    kind: str
    max_ratio: float
    def __init__(self, step: _Optional[int] = ..., origin: _Optional[str] = ..., kind: _Optional[str] = ..., max_ratio: _Optional[float] = ...) -> None: ...

class AdaptStatus(_message.Message):
    __slots__ = ("controller", "adapt_every", "groups", "params_json", "reports_accepted", "reports_refused", "samples_reported", "changes", "group_loss", "group_samples", "group_weight", "source_loss", "source_samples")
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    ADAPT_EVERY_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    REPORTS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REPORTS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_REPORTED_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    GROUP_LOSS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    GROUP_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LOSS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    controller: str
    adapt_every: int
    groups: str
    params_json: str
    reports_accepted: int
    reports_refused: int
    samples_reported: int
    changes: _containers.RepeatedCompositeFieldContainer[WeightChange]
    group_loss: _containers.RepeatedScalarFieldContainer[float]
    group_samples: _containers.RepeatedScalarFieldContainer[int]
    group_weight: _containers.RepeatedScalarFieldContainer[float]
    source_loss: _containers.RepeatedScalarFieldContainer[float]
    source_samples: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, controller: _Optional[str] = ..., adapt_every: _Optional[int] = ..., groups: _Optional[str] = ..., params_json: _Optional[str] = ..., reports_accepted: _Optional[int] = ..., reports_refused: _Optional[int] = ..., samples_reported: _Optional[int] = ..., changes: _Optional[_Iterable[_Union[WeightChange, _Mapping]]] = ..., group_loss: _Optional[_Iterable[float]] = ..., group_samples: _Optional[_Iterable[int]] = ..., group_weight: _Optional[_Iterable[float]] = ..., source_loss: _Optional[_Iterable[float]] = ..., source_samples: _Optional[_Iterable[int]] = ...) -> None: ...

class LaneOpen(_message.Message):
    __slots__ = ("lane", "rank", "world_size", "start_step", "lookahead", "step_stride", "step_offset", "stop_step", "read_only", "rank_count")
    LANE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    STEP_STRIDE_FIELD_NUMBER: _ClassVar[int]
    STEP_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STOP_STEP_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    RANK_COUNT_FIELD_NUMBER: _ClassVar[int]
    lane: int
    rank: int
    world_size: int
    start_step: int
    lookahead: int
    step_stride: int
    step_offset: int
    stop_step: int
    read_only: bool
    rank_count: int
    def __init__(self, lane: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., start_step: _Optional[int] = ..., lookahead: _Optional[int] = ..., step_stride: _Optional[int] = ..., step_offset: _Optional[int] = ..., stop_step: _Optional[int] = ..., read_only: _Optional[bool] = ..., rank_count: _Optional[int] = ...) -> None: ...

class LaneAck(_message.Message):
    __slots__ = ("lane", "next_step", "rank_steps")
    LANE_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_STEPS_FIELD_NUMBER: _ClassVar[int]
    lane: int
    next_step: int
    rank_steps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lane: _Optional[int] = ..., next_step: _Optional[int] = ..., rank_steps: _Optional[_Iterable[int]] = ...) -> None: ...

class NodeReport(_message.Message):
    __slots__ = ("node", "agent_id", "consumers", "bytes_downloaded", "cache_hits", "cache_misses", "cache_bytes", "cache_limit", "shards_downloaded")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWNLOADED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_DOWNLOADED_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_id: str
    consumers: int
    bytes_downloaded: int
    cache_hits: int
    cache_misses: int
    cache_bytes: int
    cache_limit: int
    shards_downloaded: int
    def __init__(self, node: _Optional[str] = ..., agent_id: _Optional[str] = ..., consumers: _Optional[int] = ..., bytes_downloaded: _Optional[int] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., cache_limit: _Optional[int] = ..., shards_downloaded: _Optional[int] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("job", "open", "acks", "close", "node")
    JOB_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    job: str
    open: _containers.RepeatedCompositeFieldContainer[LaneOpen]
    acks: _containers.RepeatedCompositeFieldContainer[LaneAck]
    close: _containers.RepeatedScalarFieldContainer[int]
    node: NodeReport
    def __init__(self, job: _Optional[str] = ..., open: _Optional[_Iterable[_Union[LaneOpen, _Mapping]]] = ..., acks: _Optional[_Iterable[_Union[LaneAck, _Mapping]]] = ..., close: _Optional[_Iterable[int]] = ..., node: _Optional[_Union[NodeReport, _Mapping]] = ...) -> None: ...

class LaneSlices(_message.Message):
    __slots__ = ("lane", "slices")
    LANE_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    lane: int
    slices: _containers.RepeatedCompositeFieldContainer[Slice]
    def __init__(self, lane: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[Slice, _Mapping]]] = ...) -> None: ...

class LaneEvent(_message.Message):
    __slots__ = ("lane", "acked_step", "error_code", "error")
    LANE_FIELD_NUMBER: _ClassVar[int]
    ACKED_STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    lane: int
    acked_step: int
    error_code: str
    error: str
    def __init__(self, lane: _Optional[int] = ..., acked_step: _Optional[int] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("lanes", "events")
    LANES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    lanes: _containers.RepeatedCompositeFieldContainer[LaneSlices]
    events: _containers.RepeatedCompositeFieldContainer[LaneEvent]
    def __init__(self, lanes: _Optional[_Iterable[_Union[LaneSlices, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[LaneEvent, _Mapping]]] = ...) -> None: ...

class SessionStatus(_message.Message):
    __slots__ = ("peer", "node", "ranks", "lanes", "seconds_open")
    PEER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_OPEN_FIELD_NUMBER: _ClassVar[int]
    peer: str
    node: NodeReport
    ranks: _containers.RepeatedScalarFieldContainer[int]
    lanes: int
    seconds_open: float
    def __init__(self, peer: _Optional[str] = ..., node: _Optional[_Union[NodeReport, _Mapping]] = ..., ranks: _Optional[_Iterable[int]] = ..., lanes: _Optional[int] = ..., seconds_open: _Optional[float] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("step", "clip", "weights", "source", "source_weight", "source_weights", "global_tokens")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    step: int
    clip: int
    weights: _containers.RepeatedScalarFieldContainer[float]
    source: str
    source_weight: float
    source_weights: _containers.RepeatedScalarFieldContainer[float]
    global_tokens: int
    def __init__(self, step: _Optional[int] = ..., clip: _Optional[int] = ..., weights: _Optional[_Iterable[float]] = ..., source: _Optional[str] = ..., source_weight: _Optional[float] = ..., source_weights: _Optional[_Iterable[float]] = ..., global_tokens: _Optional[int] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("effective_step",)
    EFFECTIVE_STEP_FIELD_NUMBER: _ClassVar[int]
    effective_step: int
    def __init__(self, effective_step: _Optional[int] = ...) -> None: ...
