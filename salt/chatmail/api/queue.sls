{#- OpenSMTPD lists its queue to root only (`smtpctl show queue`): a scheduled job as root
    writes the listing every minute into a root:<api group> 2750 directory, where the
    API reads it (settings queue_snapshot); written whole, then renamed, so the API never
    reads half a listing. Postfix needs none: the API runs `postqueue -j` itself
    through the postdrop group. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/files/schedule.jinja" import scheduled_job with context %}
{%- from "chatmail/api/common.jinja" import queue_dir, queue_snapshot with context %}

include:
  - chatmail.users
  - chatmail.chatmaild
  - chatmail.checks

chatmail-api-smtpd-queue-dir:
  file.directory:
    - name: {{ queue_dir }}
    - user: root
    - group: {{ chatmail.users.api_group }}
    # setgid: the listing is written with smtpctl's group and must stay the API's
    - mode: "2750"
    - makedirs: True
    - require:
      - group: chatmail-users-api-group
{{ scheduled_job("chatmail-api-smtpd-queue", {
     "unit": "chatmail-smtpd-queue",
     "description": "OpenSMTPD queue listing for the chatmail control API",
     "command": "smtpctl show queue > " ~ queue_snapshot ~ ".tmp && mv " ~ queue_snapshot ~ ".tmp " ~ queue_snapshot,
     "user": "root",
     "every": "1min",
     "source": "salt://chatmail/api/files/chatmail-smtpd-queue.service.jinja",
     "context": {"queue_dir": queue_dir},
     "require": [{"file": "chatmail-api-smtpd-queue-dir"}],
   }) }}
