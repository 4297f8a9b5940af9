"""The one ``Settings`` object: environment variables (``LASER_*``) and CLI flags, validated at start-up."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """laser-serve settings. Every field is also an env var LASER_<NAME> and a flag --<name>."""

    model_config = SettingsConfigDict(
        env_prefix="LASER_", cli_kebab_case=True, cli_prog_name="laser-serve", cli_implicit_flags=True,
        cli_hide_none_type=True, extra="ignore",
        hide_input_in_errors=True,  # errors name the setting and the rule, never echo a key or database URL
    )

    model: str = Field("smollm2-135m", description="Model: the alias 'smollm2-135m', a local Hugging Face folder, or a .gguf file.")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'.")
    dtype: str = Field("auto", description="'auto' (float32 on CPU, bfloat16/float16 on CUDA), float32, bfloat16, float16.")
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    data_dir: Path = Field(Path("data"), description=(
        "Where the SVD cache and exports live, and profiles, datasets and jobs (SQLite) unless database_url is set."))
    database_url: SecretStr | None = Field(None, description=(
        "PostgreSQL URL (postgresql://user:password@host:5432/dbname) holding profiles, datasets and jobs, "
        "shared by every replica. Unset: an embedded SQLite file under data_dir."))
    database_pool_size: int = Field(8, ge=1, le=100, description=(
        "Connections to the database (and threads doing store work off the event loop)."))
    cache_dir: Path | None = Field(None, description="GGUF conversion cache (default ~/.cache/laser-serve or $LASER_CACHE_DIR).")
    admin_api_key: SecretStr | None = Field(None, description="Bearer key for mutations (profiles, datasets, jobs, export). Unset: open.")
    api_key: SecretStr | None = Field(None, description="Bearer key for inference (generate, score, compare, completions). Unset: open.")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins (JSON list). Empty: CORS off.")
    default_profile: str = Field("base", description="Profile used when a request names none (pin production traffic here).")
    max_queue: int = Field(256, ge=1, description="Queued requests (each may hold several prompts) before 429 with Retry-After.")
    max_running: int = Field(16, ge=1, le=1024, description=(
        "Rows in the continuous batch at once (generating, scoring or prefilling; any mix of profiles). "
        "Requests beyond it wait and join as rows finish."))
    max_batch_tokens: int = Field(2048, ge=2, le=1 << 20, description=(
        "Tokens computed per engine step: one per decoding row, the rest on prompt chunks. Must exceed "
        "max_running."))
    prefill_chunk: int = Field(512, ge=1, le=1 << 20, description=(
        "Longest slice of one prompt computed in one step: a long prompt delays running rows by one chunk "
        "per step at most."))
    profile_cache_bytes: int = Field(1 << 30, ge=0, description=(
        "Bytes of compiled profiles (per-row factors) kept; least recently served ones beyond it are dropped "
        "and recompiled from the SVD cache when needed."))
    max_prompt_tokens: int = Field(4096, ge=1, description="Longest prompt accepted, in tokens.")
    max_new_tokens: int = Field(1024, ge=1, description="Largest max_new_tokens / max_tokens accepted.")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="Largest request body accepted.")
    edit_cache_bytes: int = Field(1 << 30, ge=0, description="Bytes of materialised edited weights kept (LRU).")
    svd_cache_bytes: int = Field(2 << 30, ge=0, description="Bytes of in-memory SVD factors kept (LRU).")
    svd_disk_cache_bytes: int = Field(8 << 30, ge=0, description="Bytes of SVD factors persisted under data_dir/svd (0: off).")
    profile_refresh_s: float = Field(2.0, ge=0, description=(
        "Seconds between checks for profiles written by other replicas sharing the store (0: off)."))
    ray_address: str | None = Field(None, description=(
        "Run sweep steps on a pool of Ray actors at this address ('local' starts a local cluster); unset: in-process."))
    ray_actors: int = Field(2, ge=1, le=1024, description="Ray actors per sweep job (each loads the model).")
    ray_threads_per_actor: int = Field(1, ge=1, le=256, description="Torch threads (and Ray CPUs) per actor.")
    job_lease_s: float = Field(30.0, ge=0.5, le=3600, description=(
        "Seconds a sweep job's owner may go without a heartbeat (renewed every job_lease_s/3) before another "
        "replica takes the job over and resumes it."))
    arch_spec: Path | None = Field(None, description="JSON file registering an extra architecture (see README).")
    log_level: str = Field("info", description="debug, info, warning, error.")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("log_level must be one of debug, info, warning, error, critical")
        return v

    @model_validator(mode="after")
    def _budget(self) -> Settings:
        if self.max_batch_tokens <= self.max_running:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must exceed max_running "
                             f"({self.max_running}): a full decode step must leave room for a prompt chunk")
        return self

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        if not v.get_secret_value().startswith(("postgresql://", "postgres://")):  # never echo it: secrets
            raise ValueError("database_url must be a postgresql:// URL; unset it for the embedded SQLite "
                             "database under data_dir")
        return v

    @property
    def db_path(self) -> Path:
        return self.data_dir / "laser.sqlite3"
