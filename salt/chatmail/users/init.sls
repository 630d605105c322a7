{#- System users: vmail owns the mailboxes and runs the chatmaild daemons; the control
    API runs as its own user and reads the counters through its group. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set u = chatmail.users %}

chatmail-users-vmail-group:
  group.present:
    - name: {{ u.vmail_group }}
    - system: True

chatmail-users-vmail:
  user.present:
    - name: {{ u.vmail }}
    - gid: {{ u.vmail_group }}
    - home: {{ chatmail.paths.vmail_home }}
    - createhome: True
    - shell: {{ chatmail.paths.nologin }}
    - system: True
    - require:
      - group: chatmail-users-vmail-group

chatmail-users-vmail-home:
  file.directory:
    - name: {{ chatmail.paths.vmail_home }}
    - user: {{ u.vmail }}
    - group: {{ u.vmail_group }}
    - mode: "0750"
    - require:
      - user: chatmail-users-vmail

chatmail-users-api-group:
  group.present:
    - name: {{ u.api_group }}
    - system: True

chatmail-users-api:
  user.present:
    - name: {{ u.api }}
    - gid: {{ u.api_group }}
    - home: /nonexistent
    - createhome: False
    - shell: {{ chatmail.paths.nologin }}
    - system: True
    - require:
      - group: chatmail-users-api-group
