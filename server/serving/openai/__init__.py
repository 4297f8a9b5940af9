"""Logic of the OpenAI-compatible routes: tokenization, limits, engine calls, and the response layout.

Expected failures raise :class:`OpenAIApiError` (an :class:`ApiError` with an OpenAI ``code``); the router
turns every exception into OpenAI's error body. Streaming entry points validate everything first and only
then return an async iterator of server-sent events (framed by :mod:`server.sse`), so a bad request still
gets a proper 4xx.

Log-prob layout of /v1/completions (what lm-evaluation-harness's ``local-completions`` reads): with
``echo`` the lists cover the prompt tokens (first log-prob null) followed by every generated token,
including an EOS that ended generation (its text is not part of ``text``). A greedy ``max_tokens: 1``
echo request (lm-eval's loglikelihood call) is answered from a single scoring pass.

Modules: :mod:`.common` (errors, token text, limits and checks every endpoint shares), :mod:`.models`
(``/v1/models``), :mod:`.completions`, :mod:`.chat`, :mod:`.tokenize` (``/tokenize``, ``/detokenize``,
``/tokenizer_info``).
"""
