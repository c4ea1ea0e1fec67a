from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConfigFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONFIG_FORMAT_JSON: _ClassVar[ConfigFormat]
    CONFIG_FORMAT_TOML: _ClassVar[ConfigFormat]
CONFIG_FORMAT_JSON: ConfigFormat
CONFIG_FORMAT_TOML: ConfigFormat

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Controller(_message.Message):
    __slots__ = ("name", "mode", "enabled", "reason", "applied", "failed", "refused", "last_error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: str
    enabled: bool
    reason: str
    applied: int
    failed: int
    refused: int
    last_error: str
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[str] = ..., enabled: _Optional[bool] = ..., reason: _Optional[str] = ..., applied: _Optional[int] = ..., failed: _Optional[int] = ..., refused: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class SignalSource(_message.Message):
    __slots__ = ("kind", "source", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    source: str
    reason: str
    def __init__(self, kind: _Optional[str] = ..., source: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StuckIo(_message.Message):
    __slots__ = ("path", "job", "seconds")
    PATH_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    job: str
    seconds: float
    def __init__(self, path: _Optional[str] = ..., job: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class ExecutorCounters(_message.Message):
    __slots__ = ("stalled", "queued", "retries_pending", "counts", "stuck", "quarantined")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class QuarantinedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STALLED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RETRIES_PENDING_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    STUCK_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    stalled: bool
    queued: int
    retries_pending: int
    counts: _containers.ScalarMap[str, int]
    stuck: _containers.RepeatedCompositeFieldContainer[StuckIo]
    quarantined: _containers.ScalarMap[str, str]
    def __init__(self, stalled: _Optional[bool] = ..., queued: _Optional[int] = ..., retries_pending: _Optional[int] = ..., counts: _Optional[_Mapping[str, int]] = ..., stuck: _Optional[_Iterable[_Union[StuckIo, _Mapping]]] = ..., quarantined: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "runtime_name", "runtime_version", "nri_version", "connection", "reconnects", "policy", "dry_run", "controllers", "runq_backend", "runq_reason", "signal_windows", "signal_sources", "executor", "pod_spec_roles")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_NAME_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    NRI_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    CONTROLLERS_FIELD_NUMBER: _ClassVar[int]
    RUNQ_BACKEND_FIELD_NUMBER: _ClassVar[int]
    RUNQ_REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_SOURCES_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    POD_SPEC_ROLES_FIELD_NUMBER: _ClassVar[int]
    version: str
    runtime_name: str
    runtime_version: str
    nri_version: str
    connection: str
    reconnects: int
    policy: str
    dry_run: bool
    controllers: _containers.RepeatedCompositeFieldContainer[Controller]
    runq_backend: str
    runq_reason: str
    signal_windows: int
    signal_sources: _containers.RepeatedCompositeFieldContainer[SignalSource]
    executor: ExecutorCounters
    pod_spec_roles: str
    def __init__(self, version: _Optional[str] = ..., runtime_name: _Optional[str] = ..., runtime_version: _Optional[str] = ..., nri_version: _Optional[str] = ..., connection: _Optional[str] = ..., reconnects: _Optional[int] = ..., policy: _Optional[str] = ..., dry_run: _Optional[bool] = ..., controllers: _Optional[_Iterable[_Union[Controller, _Mapping]]] = ..., runq_backend: _Optional[str] = ..., runq_reason: _Optional[str] = ..., signal_windows: _Optional[int] = ..., signal_sources: _Optional[_Iterable[_Union[SignalSource, _Mapping]]] = ..., executor: _Optional[_Union[ExecutorCounters, _Mapping]] = ..., pod_spec_roles: _Optional[str] = ...) -> None: ...

class ListContainersRequest(_message.Message):
    __slots__ = ("include_plan_json",)
    INCLUDE_PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    include_plan_json: bool
    def __init__(self, include_plan_json: _Optional[bool] = ...) -> None: ...

class Container(_message.Message):
    __slots__ = ("id", "pod", "name", "full_name", "qos_class", "pool", "cpus", "mems", "cpu_shares", "oom_score_adj", "rdt_class", "io_weight", "net_class", "reasons", "classification")
    class ReasonsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FULL_NAME_FIELD_NUMBER: _ClassVar[int]
    QOS_CLASS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMS_FIELD_NUMBER: _ClassVar[int]
    CPU_SHARES_FIELD_NUMBER: _ClassVar[int]
    OOM_SCORE_ADJ_FIELD_NUMBER: _ClassVar[int]
    RDT_CLASS_FIELD_NUMBER: _ClassVar[int]
    IO_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NET_CLASS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    pod: str
    name: str
    full_name: str
    qos_class: str
    pool: str
    cpus: str
    mems: str
    cpu_shares: int
    oom_score_adj: int
    rdt_class: str
    io_weight: int
    net_class: str
    reasons: _containers.ScalarMap[str, str]
    classification: str
    def __init__(self, id: _Optional[str] = ..., pod: _Optional[str] = ..., name: _Optional[str] = ..., full_name: _Optional[str] = ..., qos_class: _Optional[str] = ..., pool: _Optional[str] = ..., cpus: _Optional[str] = ..., mems: _Optional[str] = ..., cpu_shares: _Optional[int] = ..., oom_score_adj: _Optional[int] = ..., rdt_class: _Optional[str] = ..., io_weight: _Optional[int] = ..., net_class: _Optional[str] = ..., reasons: _Optional[_Mapping[str, str]] = ..., classification: _Optional[str] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("name", "cpus", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    cpus: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., cpus: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListContainersReply(_message.Message):
    __slots__ = ("policy", "containers", "pools", "online_demand_millicores", "plan_json")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_DEMAND_MILLICORES_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    policy: str
    containers: _containers.RepeatedCompositeFieldContainer[Container]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    online_demand_millicores: int
    plan_json: str
    def __init__(self, policy: _Optional[str] = ..., containers: _Optional[_Iterable[_Union[Container, _Mapping]]] = ..., pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ..., online_demand_millicores: _Optional[int] = ..., plan_json: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("query",)
    QUERY_FIELD_NUMBER: _ClassVar[int]
    query: str
    def __init__(self, query: _Optional[str] = ...) -> None: ...

class ExplainReply(_message.Message):
    __slots__ = ("container", "events", "detections", "rungs")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    RUNGS_FIELD_NUMBER: _ClassVar[int]
    container: Container
    events: _containers.RepeatedCompositeFieldContainer[Event]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    rungs: _containers.RepeatedCompositeFieldContainer[Rung]
    def __init__(self, container: _Optional[_Union[Container, _Mapping]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., rungs: _Optional[_Iterable[_Union[Rung, _Mapping]]] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("follow", "since")
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    follow: bool
    since: float
    def __init__(self, follow: _Optional[bool] = ..., since: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "kind", "subject", "message")
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    time: float
    kind: str
    subject: str
    message: str
    def __init__(self, time: _Optional[float] = ..., kind: _Optional[str] = ..., subject: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SignalsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ContainerSignals(_message.Message):
    __slots__ = ("id", "name", "runq_p90_us", "runq_mean_us", "cpu_pressure", "memory_pressure", "io_pressure", "cpu_cores", "throttled_ratio", "memory_bytes", "cpi")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RUNQ_P90_US_FIELD_NUMBER: _ClassVar[int]
    RUNQ_MEAN_US_FIELD_NUMBER: _ClassVar[int]
    CPU_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    IO_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPI_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    runq_p90_us: float
    runq_mean_us: float
    cpu_pressure: float
    memory_pressure: float
    io_pressure: float
    cpu_cores: float
    throttled_ratio: float
    memory_bytes: int
    cpi: float
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., runq_p90_us: _Optional[float] = ..., runq_mean_us: _Optional[float] = ..., cpu_pressure: _Optional[float] = ..., memory_pressure: _Optional[float] = ..., io_pressure: _Optional[float] = ..., cpu_cores: _Optional[float] = ..., throttled_ratio: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., cpi: _Optional[float] = ...) -> None: ...

class Antagonist(_message.Message):
    __slots__ = ("name", "score", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    score: float
    reason: str
    def __init__(self, name: _Optional[str] = ..., score: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("victim", "verdict", "delay_ms", "threshold_ms", "cpu_pressure", "windows", "confidence", "antagonists", "reason")
    VICTIM_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_MS_FIELD_NUMBER: _ClassVar[int]
    CPU_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ANTAGONISTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    victim: str
    verdict: str
    delay_ms: float
    threshold_ms: float
    cpu_pressure: float
    windows: int
    confidence: float
    antagonists: _containers.RepeatedCompositeFieldContainer[Antagonist]
    reason: str
    def __init__(self, victim: _Optional[str] = ..., verdict: _Optional[str] = ..., delay_ms: _Optional[float] = ..., threshold_ms: _Optional[float] = ..., cpu_pressure: _Optional[float] = ..., windows: _Optional[int] = ..., confidence: _Optional[float] = ..., antagonists: _Optional[_Iterable[_Union[Antagonist, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class Rung(_message.Message):
    __slots__ = ("victim", "rung", "on")
    VICTIM_FIELD_NUMBER: _ClassVar[int]
    RUNG_FIELD_NUMBER: _ClassVar[int]
    ON_FIELD_NUMBER: _ClassVar[int]
    victim: str
    rung: str
    on: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, victim: _Optional[str] = ..., rung: _Optional[str] = ..., on: _Optional[_Iterable[str]] = ...) -> None: ...

class SignalsReply(_message.Message):
    __slots__ = ("window", "end_s", "window_s", "runq_backend", "containers", "detections", "rungs", "sources")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    RUNQ_BACKEND_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    RUNGS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    window: int
    end_s: float
    window_s: float
    runq_backend: str
    containers: _containers.RepeatedCompositeFieldContainer[ContainerSignals]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    rungs: _containers.RepeatedCompositeFieldContainer[Rung]
    sources: _containers.RepeatedCompositeFieldContainer[SignalSource]
    def __init__(self, window: _Optional[int] = ..., end_s: _Optional[float] = ..., window_s: _Optional[float] = ..., runq_backend: _Optional[str] = ..., containers: _Optional[_Iterable[_Union[ContainerSignals, _Mapping]]] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., rungs: _Optional[_Iterable[_Union[Rung, _Mapping]]] = ..., sources: _Optional[_Iterable[_Union[SignalSource, _Mapping]]] = ...) -> None: ...

class NumaRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NumaNode(_message.Message):
    __slots__ = ("node", "cpus", "millicores", "memory_bytes", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MILLICORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: int
    cpus: str
    millicores: int
    memory_bytes: int
    reason: str
    def __init__(self, node: _Optional[int] = ..., cpus: _Optional[str] = ..., millicores: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class NumaReply(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NumaNode]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NumaNode, _Mapping]]] = ...) -> None: ...

class ConfigRequest(_message.Message):
    __slots__ = ("format",)
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    format: ConfigFormat
    def __init__(self, format: _Optional[_Union[ConfigFormat, str]] = ...) -> None: ...

class ConfigReply(_message.Message):
    __slots__ = ("format", "text", "source", "dry_run")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    format: ConfigFormat
    text: str
    source: str
    dry_run: bool
    def __init__(self, format: _Optional[_Union[ConfigFormat, str]] = ..., text: _Optional[str] = ..., source: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class SetDryRunRequest(_message.Message):
    __slots__ = ("on",)
    ON_FIELD_NUMBER: _ClassVar[int]
    on: bool
    def __init__(self, on: _Optional[bool] = ...) -> None: ...

class SetDryRunReply(_message.Message):
    __slots__ = ("dry_run", "previous", "message")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    previous: bool
    message: str
    def __init__(self, dry_run: _Optional[bool] = ..., previous: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ReadyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadyReply(_message.Message):
    __slots__ = ("ready", "reason", "connection", "synchronized", "fail_open_recent")
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    SYNCHRONIZED_FIELD_NUMBER: _ClassVar[int]
    FAIL_OPEN_RECENT_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    reason: str
    connection: str
    synchronized: bool
    fail_open_recent: int
    def __init__(self, ready: _Optional[bool] = ..., reason: _Optional[str] = ..., connection: _Optional[str] = ..., synchronized: _Optional[bool] = ..., fail_open_recent: _Optional[int] = ...) -> None: ...
