"""Every endpoint of laser-serve, written once as a :class:`~clients.core.Call` handed to ``self._send``.

:class:`~clients.sync.LaserClient` sends it with ``httpx.Client`` and returns the result;
:class:`~clients.aio.AsyncLaserClient` sends it with ``httpx.AsyncClient`` and returns an awaitable of the same
result. Results are the server's own protocol models (:mod:`laser_protocol`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx

from clients.core import (
    UNSET,
    Call,
    ClientBase,
    T,
    as_list,
    as_model,
    compact,
    generate_params,
    score_params,
    seg,
)
from laser_protocol.datasets import DatasetDeleted, DatasetPublic, DatasetSummary
from laser_protocol.exports import ExportDeleted, ExportFile, ExportPublic, ExportSummary
from laser_protocol.inference import CompareResponse, GenerateResponse, ScoreResponse
from laser_protocol.jobs import ExamplePage, JobDeleted, JobPublic, JobSummary
from laser_protocol.openai import ModelCard
from laser_protocol.profiles import ProfileDeleted, ProfileDryRun, ProfilePublic
from laser_protocol.system import Health, Info, Readiness


class Endpoints(ClientBase):
    """Every endpoint, written once. In :class:`AsyncLaserClient` each returns an awaitable of the annotated type."""

    def _send(self, call: Call[T]) -> T:  # overridden by each client
        raise NotImplementedError

    # -- system ----------------------------------------------------------------------------------

    def health(self) -> Health:
        """``GET /health``: the process answers."""
        return self._send(Call("GET", "/health", "open", as_model(Health)))

    def ready(self) -> Readiness:
        """``GET /ready``: the model is loaded (a 503 answer is returned as ``ready=False``, not raised)."""
        return self._send(Call("GET", "/ready", "open", as_model(Readiness), accept=frozenset({503})))

    def info(self) -> Info:
        """``GET /info``: the model, its LASER types, dtype, device, version."""
        return self._send(Call("GET", "/info", "open", as_model(Info)))

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self._send(Call("GET", "/metrics", "open", lambda r: r.text))

    # -- profiles --------------------------------------------------------------------------------

    def list_profiles(self) -> list[ProfilePublic]:
        """Every profile, 'base' first."""
        return self._send(Call("GET", "/v1/profiles", "inference", as_list(ProfilePublic)))

    def get_profile(self, name: str) -> ProfilePublic:
        return self._send(Call("GET", f"/v1/profiles/{seg(name)}", "inference", as_model(ProfilePublic)))

    def create_profile(self, name: str, interventions: Sequence[Mapping[str, Any]], *,
                       description: str = "") -> ProfilePublic:
        """Create a profile (409 if it exists: use :meth:`replace_profile`)."""
        body = {"name": name, "description": description, "interventions": [dict(i) for i in interventions]}
        return self._send(Call("POST", "/v1/profiles", "admin", as_model(ProfilePublic), json=body))

    def replace_profile(self, name: str, interventions: Sequence[Mapping[str, Any]], *,
                        description: str = "") -> ProfilePublic:
        """Create or replace a profile (``PUT``); live traffic uses it from the next batch."""
        body = {"description": description, "interventions": [dict(i) for i in interventions]}
        return self._send(Call("PUT", f"/v1/profiles/{seg(name)}", "admin", as_model(ProfilePublic), json=body))

    def dry_run_profile(self, name: str, interventions: Sequence[Mapping[str, Any]]) -> ProfileDryRun:
        """Per-matrix k, retained energy and Frobenius error of a would-be profile; nothing stored."""
        body = {"description": "", "interventions": [dict(i) for i in interventions]}
        return self._send(Call("PUT", f"/v1/profiles/{seg(name)}", "admin", as_model(ProfileDryRun), json=body,
                               params={"dry_run": "true"}))

    def delete_profile(self, name: str) -> ProfileDeleted:
        return self._send(Call("DELETE", f"/v1/profiles/{seg(name)}", "admin", as_model(ProfileDeleted)))

    # -- inference -------------------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, prompts: Sequence[str] | None = None, profile: str | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None) -> GenerateResponse:
        """Generate from one prompt (or several, ``prompts``) with a profile (default: the server's)."""
        body = {**generate_params(prompt, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop),
                **compact(profile=profile)}
        return self._send(Call("POST", "/v1/generate", "inference", as_model(GenerateResponse), json=body))

    def score(self, context: str | None = None, continuations: Sequence[str] | None = None, *, text: str | None = None,
              normalize: bool = False, profile: str | None = None) -> ScoreResponse:
        """Log-prob of each continuation given the context (with argmax), or the perplexity of ``text``."""
        body = {**score_params(context, continuations, text, normalize), **compact(profile=profile)}
        return self._send(Call("POST", "/v1/score", "inference", as_model(ScoreResponse), json=body))

    def compare(self, profiles: Sequence[str], prompt: str | None = None, *, prompts: Sequence[str] | None = None,
                context: str | None = None, continuations: Sequence[str] | None = None, text: str | None = None,
                normalize: bool = False, max_new_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                stop: str | Sequence[str] | None = None) -> CompareResponse:
        """The same request on each profile, side by side, with a diff against the first.

        A score comparison when ``context``/``continuations`` or ``text`` is given, else a generate one.
        """
        body: dict[str, Any] = {"profiles": list(profiles)}
        if context is not None or continuations is not None or text is not None:
            body["score"] = score_params(context, continuations, text, normalize)
        else:
            body["generate"] = generate_params(prompt, prompts, max_new_tokens, temperature, top_p, top_k, seed,
                                                stop)
        return self._send(Call("POST", "/v1/compare", "inference", as_model(CompareResponse), json=body))

    # -- OpenAI-compatible models ----------------------------------------------------------------

    def list_models(self) -> list[ModelCard]:
        """``GET /v1/models``: base and every profile (use the OpenAI SDK for completions)."""
        return self._send(Call("GET", "/v1/models", "inference", as_list(ModelCard)))

    def get_model(self, model: str) -> ModelCard:
        return self._send(Call("GET", f"/v1/models/{seg(model)}", "inference", as_model(ModelCard)))

    # -- datasets --------------------------------------------------------------------------------

    def list_datasets(self) -> list[DatasetSummary]:
        return self._send(Call("GET", "/v1/datasets", "inference", as_list(DatasetSummary)))

    def get_dataset(self, name: str) -> DatasetPublic:
        return self._send(Call("GET", f"/v1/datasets/{seg(name)}", "inference", as_model(DatasetPublic)))

    def upload_dataset(self, name: str, content: str | Mapping[str, Any] | Sequence[Mapping[str, Any]] | os.PathLike,
                       *, format: Literal["jsonl", "bigbench"] = "jsonl", kind: str | None = None,
                       prompt_template: str | None = None, single_target_only: bool = False,
                       description: str = "") -> DatasetPublic:
        """Upload a dataset: JSONL text, a list of row dicts (sent as JSONL), a BIG-bench task, or a local file.

        A rejected upload raises :class:`~clients.errors.UnprocessableError` whose ``errors`` name each bad line.
        """
        if isinstance(content, os.PathLike):
            content = Path(content).read_text()
        elif isinstance(content, Sequence) and not isinstance(content, str):
            content = "".join(json.dumps(dict(r)) + "\n" for r in content)
        body = {"name": name, "format": format, "content": content, "single_target_only": single_target_only,
                "description": description, **compact(kind=kind, prompt_template=prompt_template)}
        return self._send(Call("POST", "/v1/datasets", "admin", as_model(DatasetPublic), json=body))

    def delete_dataset(self, name: str) -> DatasetDeleted:
        return self._send(Call("DELETE", f"/v1/datasets/{seg(name)}", "admin", as_model(DatasetDeleted)))

    # -- jobs ------------------------------------------------------------------------------------

    def create_sweep(self, dataset: str, **config: Any) -> JobPublic:
        """Queue a validation sweep (config: types, layers, rhos, strategy, kind, max_configs, ...); 202 with the job."""
        return self._send(Call("POST", "/v1/jobs/sweeps", "admin", as_model(JobPublic), json={"dataset": dataset, **config}))

    def list_jobs(self, state: str | None = None) -> list[JobSummary]:
        """Jobs, newest first (optionally only one state)."""
        return self._send(Call("GET", "/v1/jobs", "inference", as_list(JobSummary),
                               params=compact(state=state) or None))

    def get_job(self, job_id: str) -> JobPublic:
        return self._send(Call("GET", f"/v1/jobs/{seg(job_id)}", "inference", as_model(JobPublic)))

    def cancel_job(self, job_id: str) -> JobPublic:
        """Cancel a queued or running job (finished rows are kept; the best so far stays promotable)."""
        return self._send(Call("POST", f"/v1/jobs/{seg(job_id)}/cancel", "admin", as_model(JobPublic)))

    def delete_job(self, job_id: str) -> JobDeleted:
        """Delete a finished job and its rows (a queued or running one must be cancelled first)."""
        return self._send(Call("DELETE", f"/v1/jobs/{seg(job_id)}", "admin", as_model(JobDeleted)))

    def job_examples(self, job_id: str, config: str, *, split: str = "validation", filter: str = "flips",
                     offset: int = 0, limit: int = 50) -> ExamplePage:
        """Per-example evidence of ``config`` against base: ``filter`` flips (fixed or broken), fixed, broken,
        disagree or all; ``split`` validation (any config) or test (base and the winner)."""
        params = {"config": config, "split": split, "filter": filter, "offset": offset, "limit": limit}
        return self._send(Call("GET", f"/v1/jobs/{seg(job_id)}/examples", "inference", as_model(ExamplePage),
                               params=params))

    def job_plot(self, job_id: str) -> bytes:
        """PNG heatmap of validation accuracy over layer x rho."""
        return self._send(Call("GET", f"/v1/jobs/{seg(job_id)}/plot.png", "inference", lambda r: r.content))

    def promote(self, job_id: str, name: str, *, description: str | None = None, replace: bool = False) -> ProfilePublic:
        """Store the job's best config as profile ``name``."""
        body = {"name": name, "replace": replace, **compact(description=description)}
        return self._send(Call("POST", f"/v1/jobs/{seg(job_id)}/promote", "admin", as_model(ProfilePublic), json=body))

    # -- exports ---------------------------------------------------------------------------------

    def export_profile(self, profile: str, *, mode: Literal["dense", "factored"] = "dense", name: str | None = None,
                       overwrite: bool = False, factor_dtype: str | None = None,
                       timeout: float | httpx.Timeout | None = None) -> ExportPublic:
        """Have the server write ``profile`` as a Hugging Face folder (its own exports area); the export's listing.

        ``timeout`` defaults to none at all: writing a large model takes a while.
        """
        body = compact(mode=mode, name=name, overwrite=overwrite or None, factor_dtype=factor_dtype)
        return self._send(Call("POST", f"/v1/profiles/{seg(profile)}/export", "admin", as_model(ExportPublic), json=body,
                               timeout=timeout))

    def list_exports(self) -> list[ExportSummary]:
        return self._send(Call("GET", "/v1/exports", "admin", as_list(ExportSummary)))

    def get_export(self, name: str) -> ExportPublic:
        return self._send(Call("GET", f"/v1/exports/{seg(name)}", "admin", as_model(ExportPublic)))

    def delete_export(self, name: str) -> ExportDeleted:
        return self._send(Call("DELETE", f"/v1/exports/{seg(name)}", "admin", as_model(ExportDeleted)))

    # -- shared pieces of the streamed calls -----------------------------------------------------

    @staticmethod
    def _generate_stream_call(prompt: str, profile: str | None, params: dict[str, Any]) -> Call[None]:
        body = {**generate_params(prompt, None, *(params.get(k) for k in (
            "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop"))), **compact(profile=profile),
                "stream": True}
        return Call("POST", "/v1/generate", "inference", lambda r: None, json=body)

    @staticmethod
    def _events_call(job_id: str, timeout: Any = UNSET) -> Call[None]:
        return Call("GET", f"/v1/jobs/{seg(job_id)}/events", "inference", lambda r: None, timeout=timeout)

    @staticmethod
    def _file_call(export: str, file: ExportFile) -> Call[None]:
        return Call("GET", f"/v1/exports/{seg(export)}/files/{quote(file.name)}", "admin", lambda r: None)
