"""Every text of the admin page, in English and Russian.

Labels reach Gradio as `gr.I18n`, which picks the language from the browser. Messages the
server writes at run time (status lines, stats, errors) pick it from the request's
Accept-Language header with `language_from_header`.
"""

from __future__ import annotations

LANGUAGES = ("en", "ru")
DEFAULT_LANGUAGE = "en"

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        # login form
        "login_title": "Joey admin: log in",
        "login_username": "User name",
        "login_password": "Password",
        "login_submit": "Log in",
        "login_failed": "Wrong user name or password.",
        "login_throttled": "Too many failed attempts. Wait five minutes and try again.",
        # page labels
        "title": "Joey admin",
        "logout": "Log out",
        "tab_chat": "Chat",
        "tab_compare": "Compare",
        "tab_chats": "Chats",
        "tab_queue": "Queue",
        "conversation": "Conversation with Joey",
        "message": "Message",
        "message_placeholder": "Write to Joey and press Enter",
        "send": "Send",
        "stop": "Stop",
        "reset": "Reset",
        "settings": "Session settings",
        "custom_settings": "Custom generation settings",
        "custom_settings_info": "Off: the workers' own settings, as Telegram users get them.",
        "temperature": "Temperature (0 is greedy)",
        "top_p": "Top-p",
        "top_k": "Top-k (0 turns it off)",
        "repetition_penalty": "Repetition penalty",
        "max_new_tokens": "Max new tokens",
        "seed": "Seed",
        "seed_info": "Empty: random for every reply.",
        "persona": "Persona prompt override",
        "persona_placeholder": "Empty: the workers' persona.",
        "use_adapter": "LoRA adapter on",
        "compare_prompt": "Prompt",
        "compare_info": (
            "One message without history, answered twice with one seed: with the LoRA "
            "adapter and without it, by the same loaded model. Uses the session settings."
        ),
        "compare_button": "Compare",
        "with_adapter": "With the LoRA adapter",
        "without_adapter": "Base model (adapter off)",
        "chat_id": "Telegram chat id",
        "look_up": "Look up",
        "clear_history": "Clear history",
        "chat_history": "Cached history",
        "refresh": "Refresh",
        "workers": "Workers online",
        "recent_jobs": "Recent jobs",
        # run-time messages
        "no_workers": "No worker is online. Start one with `joeybot worker`, then send again.",
        "queued": "Waiting for a worker…",
        "queued_behind": "Waiting for a worker: {jobs} job(s) ahead in the queue…",
        "generating": "Generating on {worker}…",
        "stopped": "Stopped.",
        "timed_out": "Timed out: the worker did not start or stopped sending text.",
        "error": "Failed: {detail}",
        "error_invalid_options": "Invalid generation settings: {detail}",
        "error_no_engine": "The worker has no model loaded.",
        "error_worker_lost": "The worker running this reply stopped. Send the message again.",
        "error_generation_failed": "Generation failed on the worker: {detail}",
        "redis_error": "Redis is unreachable: {detail}",
        "empty_message": "Write a message first.",
        "stat_first_token": "first token {seconds} s",
        "stat_speed": "{rate} tokens/s",
        "stat_tokens": "{prompt} prompt + {new} new tokens",
        "stat_total": "{seconds} s in total",
        "stat_queue": "queue {seconds} s",
        "stat_request_to_text": "{seconds} s from send to first text",
        "stat_adapter_on": "adapter on",
        "stat_adapter_off": "adapter off",
        "stat_no_adapter": "no adapter loaded",
        "stat_token_limit": "cut at max new tokens",
        "stat_fallback": "fallback line",
        "stat_seed": "seed {seed}",
        "stat_worker": "worker {worker}",
        "chat_id_invalid": "A chat id is an integer, such as 123456789 or -1001234567890.",
        "chat_empty": "Chat {chat_id} has no cached history.",
        "chat_found": "Chat {chat_id}: {turns} turn(s).",
        "chat_cleared": "Chat {chat_id}: history cleared ({turns} turn(s)).",
        "queue_summary": "Queue depth: {depth} · workers online: {workers}",
        "col_worker": "Worker",
        "col_host": "Host",
        "col_pid": "PID",
        "col_started": "Started",
        "col_jobs_done": "Jobs done",
        "col_model": "Model",
        "col_job": "Job",
        "col_kind": "Kind",
        "col_chat": "Chat",
        "col_finished": "Finished",
        "col_queue_wait": "Queue wait, s",
        "col_duration": "Duration, s",
        "col_tokens": "New tokens",
        "col_outcome": "Outcome",
    },
    "ru": {
        "login_title": "Админка Джоуи: вход",
        "login_username": "Имя пользователя",
        "login_password": "Пароль",
        "login_submit": "Войти",
        "login_failed": "Неверное имя пользователя или пароль.",
        "login_throttled": "Слишком много неудачных попыток. Подождите пять минут.",
        "title": "Админка Джоуи",
        "logout": "Выйти",
        "tab_chat": "Чат",
        "tab_compare": "Сравнение",
        "tab_chats": "Чаты",
        "tab_queue": "Очередь",
        "conversation": "Разговор с Джоуи",
        "message": "Сообщение",
        "message_placeholder": "Напишите Джоуи и нажмите Enter",
        "send": "Отправить",
        "stop": "Остановить",
        "reset": "Сбросить",
        "settings": "Настройки сеанса",
        "custom_settings": "Свои настройки генерации",
        "custom_settings_info": "Выкл.: настройки воркеров, как у пользователей Telegram.",
        "temperature": "Температура (0 — жадный выбор)",
        "top_p": "Top-p",
        "top_k": "Top-k (0 отключает)",
        "repetition_penalty": "Штраф за повторы",
        "max_new_tokens": "Максимум новых токенов",
        "seed": "Зерно (seed)",
        "seed_info": "Пусто: случайное для каждого ответа.",
        "persona": "Своя персона (системный промпт)",
        "persona_placeholder": "Пусто: персона воркеров.",
        "use_adapter": "LoRA-адаптер включён",
        "compare_prompt": "Сообщение",
        "compare_info": (
            "Одно сообщение без истории, два ответа с одним зерном: с LoRA-адаптером и без "
            "него, от одной загруженной модели. Используются настройки сеанса."
        ),
        "compare_button": "Сравнить",
        "with_adapter": "С LoRA-адаптером",
        "without_adapter": "Базовая модель (адаптер выключен)",
        "chat_id": "ID чата в Telegram",
        "look_up": "Найти",
        "clear_history": "Очистить историю",
        "chat_history": "Сохранённая история",
        "refresh": "Обновить",
        "workers": "Воркеры в сети",
        "recent_jobs": "Последние задачи",
        "no_workers": (
            "Нет ни одного воркера в сети. Запустите `joeybot worker` и отправьте снова."
        ),
        "queued": "Ждём воркера…",
        "queued_behind": "Ждём воркера: впереди в очереди задач: {jobs}…",
        "generating": "Генерирует {worker}…",
        "stopped": "Остановлено.",
        "timed_out": "Время вышло: воркер не начал работу или перестал присылать текст.",
        "error": "Ошибка: {detail}",
        "error_invalid_options": "Неверные настройки генерации: {detail}",
        "error_no_engine": "У воркера не загружена модель.",
        "error_worker_lost": "Воркер, который писал ответ, остановился. Отправьте снова.",
        "error_generation_failed": "Генерация на воркере не удалась: {detail}",
        "redis_error": "Redis недоступен: {detail}",
        "empty_message": "Сначала напишите сообщение.",
        "stat_first_token": "первый токен {seconds} с",
        "stat_speed": "{rate} токенов/с",
        "stat_tokens": "{prompt} токенов промпта + {new} новых",
        "stat_total": "всего {seconds} с",
        "stat_queue": "очередь {seconds} с",
        "stat_request_to_text": "{seconds} с от отправки до первого текста",
        "stat_adapter_on": "адаптер включён",
        "stat_adapter_off": "адаптер выключен",
        "stat_no_adapter": "адаптер не загружен",
        "stat_token_limit": "обрезано по максимуму токенов",
        "stat_fallback": "запасная фраза",
        "stat_seed": "зерно {seed}",
        "stat_worker": "воркер {worker}",
        "chat_id_invalid": "ID чата — целое число, например 123456789 или -1001234567890.",
        "chat_empty": "У чата {chat_id} нет сохранённой истории.",
        "chat_found": "Чат {chat_id}: реплик: {turns}.",
        "chat_cleared": "Чат {chat_id}: история очищена (реплик: {turns}).",
        "queue_summary": "Длина очереди: {depth} · воркеров в сети: {workers}",
        "col_worker": "Воркер",
        "col_host": "Хост",
        "col_pid": "PID",
        "col_started": "Запущен",
        "col_jobs_done": "Задач выполнено",
        "col_model": "Модель",
        "col_job": "Задача",
        "col_kind": "Вид",
        "col_chat": "Чат",
        "col_finished": "Завершена",
        "col_queue_wait": "Ожидание, с",
        "col_duration": "Длительность, с",
        "col_tokens": "Новых токенов",
        "col_outcome": "Итог",
    },
}


def language_from_header(accept_language: str | None) -> str:
    """Return "en" or "ru": the supported language the Accept-Language header ranks highest.

    Entries look like `ru-RU`, `ru;q=0.9` or `*`; a missing or unsupported header gives English.
    """
    best_language, best_weight = DEFAULT_LANGUAGE, 0.0
    for entry in (accept_language or "").split(","):
        tag, _, parameters = entry.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        if primary not in LANGUAGES:
            continue
        weight = _quality(parameters)
        # Strictly greater: among equal weights the earlier entry wins, and q=0 never does.
        if weight > best_weight:
            best_language, best_weight = primary, weight
    return best_language


def text(language: str, key: str, **values: object) -> str:
    """Return the text for `key` in `language` (English when either is unknown), formatted."""
    table = TEXTS.get(language, TEXTS[DEFAULT_LANGUAGE])
    template = table.get(key) or TEXTS[DEFAULT_LANGUAGE][key]
    return template.format(**values) if values else template


def _quality(parameters: str) -> float:
    for parameter in parameters.split(";"):
        name, _, value = parameter.strip().partition("=")
        if name.strip() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0
