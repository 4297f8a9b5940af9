"""``/v1/models``: ``base`` and every profile, as OpenAI model cards."""

from __future__ import annotations

from laser_protocol.openai import ModelCard, ModelList
from server.state import Services
from server.serving.openai.common import OpenAIApiError, STARTED, max_positions


def list_models(services: Services) -> ModelList:
    root = services.engine.info.model_id
    limit = max_positions(services)
    cards = [ModelCard(id="base", created=STARTED, root=root, max_model_len=limit)]
    cards += [ModelCard(id=p.name, created=int(p.created_at), root=root, parent="base", max_model_len=limit,
                        description=p.description or None) for p in services.profiles.list()]
    return ModelList(data=cards)


def get_model(services: Services, name: str) -> ModelCard:
    for card in list_models(services).data:
        if card.id == name:
            return card
    known = ", ".join(c.id for c in list_models(services).data)
    raise OpenAIApiError(404, f"The model {name!r} does not exist; known models: {known}", ("path", "model"),
                         code="model_not_found")
